"""Metrics against independent implementations, real-data loaders, and an evaluation run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from thighseg.measure.agreement import bland_altman, icc_2_1
from thighseg.measure.anatomy import body_midline
from thighseg.measure.metrics import confusion_counts, overlap_metrics


def test_confusion_counts_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    truth, prediction = rng.integers(0, 4, (3, 20, 20)), rng.integers(0, 4, (3, 20, 20))
    matrix = metrics.multilabel_confusion_matrix(
        truth.ravel(), prediction.ravel(), labels=[1, 2, 3]
    )
    for label, ((tn, fp), (fn, tp)) in zip((1, 2, 3), matrix, strict=False):
        assert confusion_counts(prediction, truth, label) == (tp, fp, fn, tn)
    overlap = overlap_metrics(prediction, truth)
    assert overlap["extensor"]["dsc"] == pytest.approx(
        metrics.f1_score(truth.ravel() == 1, prediction.ravel() == 1)
    )
    assert overlap["flexor"]["sensitivity"] == pytest.approx(
        metrics.recall_score(truth.ravel() == 2, prediction.ravel() == 2)
    )


def test_icc_matches_pingouin():
    pingouin = pytest.importorskip("pingouin")
    import pandas as pd

    rng = np.random.default_rng(1)
    truth = rng.uniform(2000, 6000, 12)
    predicted = truth * rng.normal(1.0, 0.03, 12) + 40
    ours = icc_2_1(np.stack([truth, predicted], 1))
    table = pd.DataFrame(
        {
            "subject": np.tile(np.arange(12), 2),
            "rater": np.repeat(["truth", "model"], 12),
            "volume": np.concatenate([truth, predicted]),
        }
    )
    theirs = pingouin.intraclass_corr(
        table, targets="subject", raters="rater", ratings="volume"
    ).set_index("Type")
    row = "ICC2" if "ICC2" in theirs.index else "ICC(A,1)"  # pingouin 0.6 names it by McGraw & Wong
    assert ours.value == pytest.approx(theirs.loc[row, "ICC"], abs=1e-9)
    low, high = theirs.loc[row, "CI95"]
    # pingouin rounds to 2 decimals
    assert (ours.ci_low, ours.ci_high) == pytest.approx((low, high), abs=0.01)


def test_icc_rejects_too_few_subjects_and_bland_altman_is_symmetric():
    with pytest.raises(ValueError, match="at least 3"):
        icc_2_1(np.ones((2, 2)))
    ba = bland_altman(np.array([1.0, 2, 3, 4]), np.array([2.0, 3, 4, 5]))
    assert ba.mean_difference == 1.0 and ba.lower_limit == ba.upper_limit == 1.0


def test_nifti_pair_round_trip_keeps_orientation():
    nib = pytest.importorskip("nibabel")
    from thighseg.pipeline.loaders import load_nifti_pair
    from thighseg.synthetic import phantom

    study = phantom.generate(61, size=64, slices=4, slice_spacing=5.0)
    g = study.geometry
    # to RAS voxel order: x towards the right = reversed columns, y anterior = reversed rows
    ras = lambda a: a.transpose(2, 1, 0)[::-1, ::-1, :]  # noqa: E731
    affine = np.diag([g.pixel_spacing, g.pixel_spacing, g.slice_spacing, 1.0])
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        image, label = Path(folder) / "ct.nii.gz", Path(folder) / "labels.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(ras(study.hu)), affine), image)
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(ras(study.labels)).astype(np.uint8), affine), label
        )
        loaded = load_nifti_pair(image, label)
    assert np.array_equal(loaded.labels, study.labels) and np.allclose(loaded.hu, study.hu)
    assert loaded.spacing_zyx == pytest.approx((g.slice_spacing, g.pixel_spacing, g.pixel_spacing))


def test_dicom_series_with_seg_round_trip(study_factory, tmp_path):
    from thighseg.pipeline.assemble import assemble
    from thighseg.pipeline.loaders import load_dicom_with_seg
    from thighseg.pipeline.outputs import write_seg
    from thighseg.synthetic.ct_series import read_truth

    paths = study_factory(62, size=128, slices=5)
    volume = assemble(list(paths))
    truth, uids = read_truth(paths[0].parent)
    ordered = truth[[uids.index(s.SOPInstanceUID) for s in volume.sources]]
    write_seg(volume.sources, ordered, body_midline(volume.hu), tmp_path / "seg.dcm", "manual")
    loaded = load_dicom_with_seg(list(paths), tmp_path / "seg.dcm")
    assert np.array_equal(loaded.labels, ordered) and np.array_equal(loaded.hu, volume.hu)


def test_evaluation_writes_report_figures_and_sane_numbers(model_repository, tmp_path):
    pytest.importorskip("matplotlib")
    from thighseg.apps.evaluation import EvaluationConfig, run_evaluation
    from thighseg.client.volume import Backend
    from thighseg.export.validation import onnx_backend, onnx_context

    exported = model_repository / "thighseg_segformer" / "1" / "model.onnx"
    backend = Backend(onnx_backend(exported), onnx_context(exported))
    report = run_evaluation(
        {"segformer": backend}, tmp_path, EvaluationConfig(studies=3, slices=4, size=192)
    )
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    internal = saved["models"]["segformer"]["internal_test"]["summary"]
    assert 0.8 < internal["overlap"]["mean"]["dsc"]["mean"] <= 1.0
    assert internal["overlap"]["mean"]["specificity"]["mean"] > 0.99
    assert -1 <= internal["volumes"]["total_muscle_ml"]["icc_2_1"]["value"] <= 1
    assert report["models"].keys() == {"segformer"}
    stress = saved["models"]["segformer"]["stress"]["summary"]["overlap"]["mean"]["dsc"]["mean"]
    assert 0.3 < stress <= 1.0  # the test-only generator is in every default evaluation
    worst = saved["models"]["segformer"]["stress"]["summary"]["worst_study"]
    assert worst["mean_dsc"] <= stress and worst["lowest_group_dsc"] <= worst["mean_dsc"]
    assert f"({worst['case']})" in (tmp_path / "evaluation.md").read_text()
    for name in (
        "evaluation.md",
        "dsc_boxplot_external.png",
        "bland_altman_segformer_internal_test.png",
        "overlay_segformer_external_worst.png",
        "overlay_segformer_internal_test_median.png",
        "overlay_segformer_stress_worst.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_flip_averaged_inference_is_the_mean_of_a_slice_and_its_mirror():
    from thighseg.client.volume import flip_averaged

    ramp = np.linspace(0, 1, 8, dtype=np.float32)

    def lopsided(images: np.ndarray) -> np.ndarray:  # favours class 1 on the image's left
        return np.stack([images[:, 0], images[:, 0] + ramp[::-1]], axis=1)

    images = np.zeros((2, 1, 8, 8), np.float32)
    averaged = flip_averaged(lopsided)(images)
    assert np.allclose(averaged[:, 1], 0.5)  # the left-right bias cancels
    assert averaged.shape == (2, 2, 8, 8)


def test_an_ensemble_averages_logits_and_refuses_models_of_different_inputs():
    from thighseg.apps.evaluation import ensemble
    from thighseg.client.volume import Backend

    images = np.ones((1, 3, 4, 4), dtype=np.float32)
    both = ensemble([Backend(lambda x: x * 2, context=1), Backend(lambda x: x * 4, context=1)])
    assert both.context == 1 and np.allclose(both.infer(images), 3)
    with pytest.raises(ValueError, match="2D and 2.5D mixed"):
        ensemble([Backend(lambda x: x, context=0), Backend(lambda x: x, context=1)])
