"""Users' labelled CT: import from nnU-Net, NIfTI pairs and DICOM CT + SEG, checked case by case,
split by subject, read back for training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from thighseg.apps.dataset_import import LabelMap, import_sources
from thighseg.learning import dataset
from thighseg.measure.anatomy import body_midline
from thighseg.synthetic import phantom

nib = pytest.importorskip("nibabel")

# source label values: individual structures, several per group
SOURCE_VALUES = {1: 11, 2: 12, 3: 13}  # extensor, flexor, adductor -> source values
MAP_YAML = """
extensor: [quadriceps]
flexor: [12]
adductor: [adductors]
ignore: [9]
"""


def _ras(array: np.ndarray) -> np.ndarray:
    """thighseg (z, posterior rows, leftward columns) -> RAS voxel order."""
    return np.ascontiguousarray(array.transpose(2, 1, 0)[::-1, ::-1, :])


def _save(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    dz, dy, dx = spacing
    nib.save(nib.Nifti1Image(_ras(array), np.diag([dx, dy, dz, 1.0])), path)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    study = phantom.generate(seed, size=64, slices=4, slice_spacing=7.0)
    g = study.geometry
    raw = np.zeros(study.labels.shape, np.int16)
    for group, value in SOURCE_VALUES.items():
        raw[study.labels == group] = value
    raw[0, :4, :4] = 9  # an "ignore" marker
    return study.hu, raw, (g.slice_spacing, g.pixel_spacing, g.pixel_spacing)


@pytest.fixture()
def nnunet_source(tmp_path) -> Path:
    root = tmp_path / "Dataset501_Thigh"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for k, seed in enumerate((71, 72, 73, 74)):
        hu, raw, spacing = _case(seed)
        case = f"thigh_{k:03d}"
        _save(hu.astype(np.float32), spacing, root / "imagesTr" / f"{case}_0000.nii.gz")
        _save(raw, spacing, root / "labelsTr" / f"{case}.nii.gz")
    # broken cases: geometry mismatch, unmapped label value, missing label file
    hu, raw, spacing = _case(75)
    _save(hu.astype(np.float32), spacing, root / "imagesTr" / "bad_geometry_0000.nii.gz")
    _save(raw[:, :32], spacing, root / "labelsTr" / "bad_geometry.nii.gz")
    raw_unmapped = raw.copy()
    raw_unmapped[1, :3, :3] = 7
    _save(hu.astype(np.float32), spacing, root / "imagesTr" / "bad_value_0000.nii.gz")
    _save(raw_unmapped, spacing, root / "labelsTr" / "bad_value.nii.gz")
    _save(hu.astype(np.float32), spacing, root / "imagesTr" / "no_label_0000.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "quadriceps": 11, "hamstrings": 12, "adductors": 13},
                "numTraining": 7,
                "file_ending": ".nii.gz",
            }
        )
    )
    return root


def _label_map(tmp_path: Path) -> LabelMap:
    path = tmp_path / "map.yaml"
    path.write_text(MAP_YAML)
    return LabelMap.load(path)


def test_nnunet_import_maps_labels_reports_bad_cases_and_goes_on(nnunet_source, tmp_path):
    out = tmp_path / "dataset"
    report = import_sources([nnunet_source], _label_map(tmp_path), out, progress=False)
    assert [r.case_id for r in report.written] == [f"thigh_{k:03d}" for k in range(4)]
    reasons = dict(report.failed)
    assert "differ in shape (" in reasons["bad_geometry"]
    assert "label value(s) 7 not in the label map" in reasons["bad_value"]
    assert "label file missing: labelsTr/no_label.nii.gz" in reasons["no_label"]
    manifest = dataset.read_manifest(out)
    assert len(manifest.cases) == 4 and not list((out / "cases").glob("bad_*"))
    case = dataset.load_case(out, manifest.cases[0])
    study = phantom.generate(71, size=64, slices=4, slice_spacing=7.0)
    expected = study.labels.copy()
    expected[0, :4, :4] = dataset.IGNORE
    assert np.array_equal(case.labels, expected), "orientation and mapping round trip"
    assert np.abs(case.hu - study.hu).max() <= 0.5  # stored as integer HU
    assert manifest.cases[0].voxels_per_label["ignore"] == 16
    assert "4 case(s) imported, 3 failed" in report.table()
    assert manifest.digest() in (out / "card.md").read_text()
    # adding to the dataset keeps the first import's provenance: its map and its refusals
    by_value = tmp_path / "by_value.json"
    other_map = {"extensor": ["quadriceps"], "flexor": [12], "adductor": ["adductors", 7]}
    by_value.write_text(json.dumps({**other_map, "ignore": [9]}))  # 7 is now mapped
    import_sources([nnunet_source], LabelMap.load(by_value), out, progress=False)
    imports = json.loads((out / "import_report.json").read_text())["imports"]
    assert [len(i["failed"]) for i in imports] == [3, 2] and imports[0]["label_map"]["by_name"]
    card = (out / "card.md").read_text()
    assert "- import 1: " in card and "- import 2: " in card and "5 refused" in card


def test_a_changed_case_file_is_caught_by_its_hash(nnunet_source, tmp_path):
    out = tmp_path / "dataset"
    import_sources([nnunet_source], _label_map(tmp_path), out, progress=False)
    record = dataset.read_manifest(out).cases[0]
    path = out / "cases" / f"{record.case_id}.npz"
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ValueError, match="changed since import"):
        dataset.load_case(out, record)


def test_nifti_pairs_with_anisotropic_spacing(tmp_path):
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    hu, raw, spacing = _case(76)
    _save(hu.astype(np.float32), spacing, root / "images" / "p1.nii.gz")
    _save(raw, spacing, root / "labels" / "p1.nii.gz")
    _save(raw, spacing, root / "labels" / "p2.nii.gz")  # a label without its image: reported
    out = tmp_path / "dataset"
    report = import_sources([root], _label_map_values(tmp_path), out, progress=False)
    assert [r.case_id for r in report.written] == ["p1"]
    assert report.failed == [("p2", "image file missing for p2.nii.gz (nothing in images/)")]
    assert report.written[0].spacing_zyx == pytest.approx(spacing)


def _label_map_values(tmp_path: Path) -> LabelMap:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"extensor": [11], "flexor": [12], "adductor": [13], "ignore": 9}))
    return LabelMap.load(path)


def test_dicom_ct_with_seg_and_a_seg_of_another_series(study_factory, tmp_path):
    from thighseg.pipeline.assemble import assemble
    from thighseg.pipeline.outputs import write_seg
    from thighseg.synthetic.ct_series import read_truth

    root = tmp_path / "dicom"
    root.mkdir()
    paths = study_factory(81, size=64, slices=4)
    for p in paths:
        shutil.copy(p, root / f"a-{p.name}")
    volume = assemble(list(paths))
    truth, uids = read_truth(paths[0].parent)
    ordered = truth[[uids.index(s.SOPInstanceUID) for s in volume.sources]]
    write_seg(volume.sources, ordered, body_midline(volume.hu), root / "seg.dcm", "manual")
    other = study_factory(82, size=64, slices=4)  # its SEG is here, its CT is not
    other_volume = assemble(list(other))
    write_seg(
        other_volume.sources,
        ordered,
        body_midline(other_volume.hu),
        root / "orphan-seg.dcm",
        "manual",
    )
    path = tmp_path / "map.yaml"
    path.write_text(  # thighseg's own SEG: one segment per group and leg
        "extensor: [Right extensor, Left extensor]\n"
        "flexor: [Right flexor, Left flexor]\n"
        "adductor: [Right adductor, Left adductor]\n"
    )
    out = tmp_path / "dataset"
    report = import_sources([root], LabelMap.load(path), out, progress=False)
    assert len(report.written) == 1
    case = dataset.load_case(out, report.written[0])
    assert np.array_equal(case.labels, ordered)
    (failed_case, reason), *_ = report.failed
    assert "orphan-seg" in failed_case and "not among the CT series found" in reason


def test_splits_are_by_subject_and_a_split_file_is_checked(nnunet_source, tmp_path):
    out = tmp_path / "dataset"
    import_sources(
        [nnunet_source],
        _label_map(tmp_path),
        out,
        subject_regex=r"thigh_00([0-3])",
        progress=False,
    )
    splits = dataset.make_splits(dataset.read_manifest(out).subjects(), folds=2, seed=1, test=1)
    dataset.write_splits(out, splits)
    assert len(splits["test"]) == 1
    for fold in splits["folds"]:
        assert not set(fold["train"]) & set(fold["validation"])
        assert not (set(fold["train"]) | set(fold["validation"])) & set(splits["test"])
    bad = {"folds": [{"train": ["0", "1"], "validation": ["1"]}], "test": []}
    with pytest.raises(ValueError, match="on two sides: 1"):
        dataset.write_splits(out, bad)
    with pytest.raises(ValueError, match="test must be >= 0"):
        dataset.make_splits(dataset.read_manifest(out).subjects(), folds=2, test=-2)


def test_cli_import_prints_a_summary_and_a_bad_map_is_one_line(nnunet_source, tmp_path):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    cli = [sys.executable, "-m", "thighseg.cli", "dataset", "import", str(nnunet_source)]
    done = subprocess.run(
        [*cli, "--labels", str(tmp_path / "map.yaml"), "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "4 case(s) imported, 3 failed" in done.stdout
    (tmp_path / "bad.yaml").write_text("quads: [1]\n")
    done = subprocess.run(
        [*cli, "--labels", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "e")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "unknown target(s) quads" in done.stderr
    assert "Traceback" not in done.stderr


def test_fine_tune_on_a_fold_logs_validation_and_evaluate_scores_folds_and_pooled(
    nnunet_source, tmp_path
):
    pytest.importorskip("torch")
    import torch

    from thighseg.apps.evaluation import EvaluationConfig, dataset_cohorts, run_evaluation
    from thighseg.cli import _training_table, main
    from thighseg.client.volume import Backend
    from thighseg.export.validation import torch_backend
    from thighseg.learning import models
    from thighseg.learning.training import TrainConfig, train

    out = tmp_path / "dataset"
    import_sources([nnunet_source], _label_map(tmp_path), out, progress=False)
    dataset.write_splits(out, dataset.make_splits(dataset.read_manifest(out).subjects(), 2))
    weights = []
    for fold in ("0", "1"):
        config = TrainConfig(
            model="denseunet",
            subjects=0,
            randomised_subjects=0,
            steps=4,
            batch_size=2,
            data=str(out),
            fold=fold,
            validate_every=2,
            patience=5,
            init=str(models.weights_path("denseunet")),
        )
        path = tmp_path / f"fold{fold}.pt"
        summary = train(config, out=path)
        weights.append(path)
        rows = path.with_suffix(".csv").read_text().splitlines()
        assert rows[0] == "step,loss,extensor,flexor,adductor,mean" and len(rows) == 3
        assert summary["dataset_digest"] == dataset.read_manifest(out).digest()
        assert set(summary["train_subjects"]).isdisjoint(summary["validation_subjects"])
        card = path.with_suffix(".md").read_text()
        assert summary["dataset_digest"][:16] in card and f"--fold {fold}" in card
    every = dataclasses.replace(config, fold="all", steps=2)  # nothing held out to validate on
    summary = train(every, out=tmp_path / "all.pt")
    assert summary["validation_subjects"] == [] and summary["best_step"] == 2
    card = (tmp_path / "all.md").read_text()
    assert "No validation subject: the weights of the last step (2)" in card
    assert "None: every subject outside the test set was trained on" in card
    assert "no validation subjects" in _training_table(summary).splitlines()[0]
    # its scores on fold 0's validation subjects would not be held out: refused, by name
    trained_on = ["evaluate", "--data", str(out), "--weights", str(tmp_path / "all.pt")]
    with pytest.raises(SystemExit, match=r"all.pt was trained on 2 subject\(s\) of fold0"):
        main([*trained_on, "--fold", "0", "--out", str(tmp_path / "refused")])
    held_out = ["evaluate", "--data", str(out), "--weights", str(weights[0]), "--fold", "0"]
    assert main([*held_out, "--out", str(tmp_path / "held-out")]) == 0  # fold 0's own weights
    # the report says what was scored on what: never read as another dataset's or model's
    source = json.loads((tmp_path / "held-out" / "evaluation.json").read_text())["source"]
    digest = hashlib.sha256(weights[0].read_bytes()).hexdigest()[:12]
    assert source["dataset_digest"] == dataset.read_manifest(out).digest()
    text = (tmp_path / "held-out" / "evaluation.md").read_text()
    assert f"on dataset `{dataset.read_manifest(out).name}`" in text and "phantom" not in text
    assert f"fold0.pt (sha256 {digest})" in text and "augmentation: none" in text
    shipped = torch.load(models.weights_path("denseunet"), weights_only=True)["state_dict"]
    tuned = torch.load(weights[0], weights_only=True)["state_dict"]
    assert any(not torch.equal(shipped[k].float(), tuned[k].float()) for k in shipped)

    cohorts = dataset_cohorts(out, dataset.read_splits(out))
    networks = [models.load_trained("denseunet", w) for w in weights]
    backends = [Backend(torch_backend(n), models.context_of(n)) for n in networks]
    report = run_evaluation(
        {"denseunet": backends[0]},
        tmp_path / "evaluation",
        EvaluationConfig(cohorts=tuple(cohorts), studies=0, slices=0, size=0),
        studies_by_cohort=cohorts,
        cohort_backends={"fold0": {"denseunet": backends[0]}, "fold1": {"denseunet": backends[1]}},
        pooled=("fold0", "fold1"),
    )
    scored = report["models"]["denseunet"]
    assert set(scored) == {"fold0", "fold1", "pooled"}
    assert len(scored["pooled"]["studies"]) == 4
    assert 0 <= scored["pooled"]["summary"]["overlap"]["mean"]["dsc"]["mean"] <= 1


def test_evaluate_on_a_dataset_applies_and_records_flip_tta(nnunet_source, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "dataset"
    import_sources([nnunet_source], _label_map(tmp_path), out, progress=False)
    dataset.write_splits(out, dataset.make_splits(dataset.read_manifest(out).subjects(), 2))
    reports = {}
    for tta in ("none", "flip"):
        done = subprocess.run(
            [sys.executable, "-m", "thighseg.cli", "evaluate", "--data", str(out), "--fold", "0"]
            + ["--models", "denseunet", "--tta", tta, "--out", str(tmp_path / tta)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        reports[tta] = json.loads((tmp_path / tta / "evaluation.json").read_text())
    assert [reports[t]["config"]["tta"] for t in ("none", "flip")] == ["none", "flip"]
    assert "test-time augmentation: flip" in (tmp_path / "flip" / "evaluation.md").read_text()
    scored = {
        tta: [s["overlap"] for s in report["models"]["denseunet"]["fold0"]["studies"]]
        for tta, report in reports.items()
    }
    assert scored["flip"] != scored["none"]  # the mirror's logits were averaged in


def test_slicer_seg_nrrd_cropped_to_its_extent_lands_on_the_ct_grid(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    study = phantom.generate(77, size=64, slices=4, slice_spacing=6.0)
    g = study.geometry
    spacing = np.array([g.pixel_spacing, g.pixel_spacing, g.slice_spacing])
    origin = np.array([-160.0, -150.0, 20.0])
    root = tmp_path / "slicer"
    root.mkdir()
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag(spacing),
        "space origin": origin,
    }
    ct = np.rint(study.hu.transpose(2, 1, 0)).astype(np.int16)
    nrrd.write(str(root / "case1.nrrd"), ct, header)
    labels = study.labels.transpose(2, 1, 0)  # (x: left, y: posterior, z: superior)
    i, j, k = (np.flatnonzero(labels.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    crop = labels[i[0] : i[-1] + 1, j[0] : j[-1] + 1, k[0] : k[-1] + 1]
    segments = {}
    for n, name in enumerate(("Quadriceps", "Hamstrings", "Adductors")):
        segments |= {
            f"Segment{n}_Name": name,
            f"Segment{n}_LabelValue": str(n + 1),
            f"Segment{n}_Layer": "0",
        }
    nrrd.write(
        str(root / "case1.seg.nrrd"),
        crop.astype(np.uint8),
        {**header, "space origin": origin + spacing * [i[0], j[0], k[0]], **segments},
        custom_field_map={key: "string" for key in segments},
    )
    (root / "case2.seg.nrrd").write_bytes((root / "case1.seg.nrrd").read_bytes())  # no CT
    path = tmp_path / "map.yaml"
    path.write_text("extensor: [Quadriceps]\nflexor: [Hamstrings]\nadductor: [Adductors]\n")
    out = tmp_path / "dataset"
    report = import_sources([root], LabelMap.load(path), out, progress=False)
    assert [r.case_id for r in report.written] == ["case1"]
    case = dataset.load_case(out, report.written[0])
    assert np.array_equal(case.labels, study.labels)
    assert np.abs(case.hu - study.hu).max() <= 0.5
    assert case.spacing_zyx == pytest.approx((g.slice_spacing, g.pixel_spacing, g.pixel_spacing))
    assert "no CT volume case2.nrrd" in dict(report.failed)["case2"]


def test_the_site_scripts_dataset_imports_with_its_label_names(tmp_path):
    # scripts/site_dataset.py writes the "site" of site_adaptation.sh and site_confirmation.sh
    root = tmp_path / "Dataset600_Site"
    script = Path(__file__).resolve().parent.parent / "scripts" / "site_dataset.py"
    names = tmp_path / "labels.yaml"
    done = subprocess.run(
        [sys.executable, str(script), str(root), "4120", "4121", "--size", "96", "--slices", "3"]
        + ["--label-map", str(names)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = import_sources([root], LabelMap.load(names), tmp_path / "dataset", progress=False)
    assert [r.case_id for r in report.written] == ["site_4120", "site_4121"] and not report.failed
    case = dataset.load_case(
        tmp_path / "dataset", dataset.read_manifest(tmp_path / "dataset").cases[0]
    )
    assert case.labels.shape[0] == 3 and set(np.unique(case.labels)) == {0, 1, 2, 3}


def test_label_map_mistakes_are_one_line_each(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("extensor: [quadriceps\nflexor: hamstrings]\n")
    with pytest.raises(ValueError, match=r"broken.yaml: not valid YAML \(line \d+\)"):
        LabelMap.load(broken)
    twice = tmp_path / "twice.yaml"
    twice.write_text("extensor: [quadriceps, hamstrings]\nflexor: [Hamstrings]\n")
    with pytest.raises(ValueError, match="'Hamstrings' is mapped to both extensor and flexor"):
        LabelMap.load(twice)


def test_an_image_and_label_of_other_spacing_say_so(tmp_path):
    from thighseg.pipeline.loaders import load_nifti_raw_pair

    hu, raw, (dz, dy, dx) = _case(71)
    _save(hu.astype(np.float32), (dz, dy, dx), tmp_path / "ct.nii.gz")
    _save(raw, (dz / 2, dy, dx), tmp_path / "labels.nii.gz")  # same shape, other slice spacing
    with pytest.raises(ValueError, match=r"differ in geometry \(spacing mm \[.*\] vs \[.*\]"):
        load_nifti_raw_pair(tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz")


def test_a_users_mistakes_get_one_line_errors_and_write_nothing(nnunet_source, tmp_path):
    pytest.importorskip("torch")
    from thighseg.cli import main
    from thighseg.learning import models

    out = tmp_path / "dataset"
    import_sources([nnunet_source], _label_map(tmp_path), out, progress=False)
    dataset.write_splits(out, dataset.make_splits(dataset.read_manifest(out).subjects(), 2))
    for fold in ("7", "-1", "x"):
        with pytest.raises(SystemExit, match=f"no fold '{fold}' in splits.json \\(folds: 0–1"):
            main(["train", "--data", str(out), "--fold", fold, "--steps", "1"])
    assert not (out / "models").exists()
    evaluate = ["evaluate", "--data", str(out), "--out", str(tmp_path / "evaluation")]
    with pytest.raises(SystemExit, match="no fold '5'"):
        main([*evaluate, "--fold", "5"])
    junk = tmp_path / "junk.pt"
    junk.write_text("not weights")
    with pytest.raises(SystemExit, match="junk.pt is not a thighseg weights file"):
        main([*evaluate, "--weights", str(junk)])
    shipped = str(models.weights_path("denseunet"))
    with pytest.raises(SystemExit, match="holds denseunet weights, not segformer"):
        main([*evaluate, "--models", "segformer", "--weights", shipped])
    # export: unreadable weights leave no version; an existing version is never overwritten
    name = models.triton_name("denseunet")
    repository = tmp_path / "repository"
    source = Path(__file__).resolve().parent.parent / "model_repository" / name
    shutil.copytree(source, repository / name, ignore=shutil.ignore_patterns("*.onnx"))
    (repository / name / "1" / "model.onnx").write_bytes(b"version 1")
    export = ["export", "--repository", str(repository), "--model", "denseunet"]
    with pytest.raises(SystemExit, match="junk.pt is not a thighseg weights file"):
        main([*export, "--weights", str(junk)])
    assert not (repository / name / "2").exists()
    with pytest.raises(SystemExit, match="version 1 exists"):
        main([*export, "--weights", shipped, "--version", "1"])
    assert (repository / name / "1" / "model.onnx").read_bytes() == b"version 1"
    empty = tmp_path / "empty"
    empty.mkdir()
    labels = tmp_path / "map.yaml"
    with pytest.raises(SystemExit, match="no case found in"):
        main(["dataset", "import", str(empty), "--labels", str(labels), "--out", str(out)])
