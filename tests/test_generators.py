"""The randomised training generator varies what it must, and the stress generator (test only)
is a separate construction that training never touches."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from thighseg.core.labels import MUSCLE_GROUPS, Group
from thighseg.synthetic import cohorts, randomised, stress
from thighseg.synthetic.phantom import Geometry

ROOT = Path(__file__).resolve().parent.parent


def _shares(labels: np.ndarray) -> dict[Group, float]:
    muscle = max(1, int((labels > 0).sum()))
    return {g: float((labels == g).sum()) / muscle for g in MUSCLE_GROUPS}


def test_randomised_subjects_are_deterministic_and_vary_widely():
    a, b = randomised.generate(5, size=96, slices=2), randomised.generate(5, size=96, slices=2)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    subjects = [randomised.sample_subject(seed) for seed in range(200)]
    adductor = [s.septa.adductor_span for s in subjects]
    assert min(adductor) < 0.6 and max(adductor) > 2.2, "adductors: small wedge to large mass"
    assert {len(s.sides) for s in subjects} == {1, 2}, "one-leg studies are drawn too"
    assert {s.metal for s in subjects} >= {"none", "nail", "prosthesis"}
    assert min(s.leg_gap for s in subjects) < 0 < max(s.leg_gap for s in subjects)
    assert max(max(s.infiltration) for s in subjects) > 0.4
    fat = [s.appearance.hu[randomised.Tissue.FAT] for s in subjects]
    assert max(fat) - min(fat) > 90, "tissue HU drawn from ranges wider than real"
    assert any(s.appearance.hu[randomised.Tissue.VESSEL] > 150 for s in subjects), "contrast"


def test_randomised_labels_sit_on_muscle_and_the_septa_are_darker():
    for seed in range(6):
        study = randomised.generate(seed, size=128, slices=1)
        labels, hu = study.labels[0], study.hu[0]
        subject = study.subject
        muscle_hu = subject.appearance.hu[randomised.Tissue.MUSCLE]
        fat_hu = subject.appearance.hu[randomised.Tissue.FAT]
        assert (labels > 0).sum() > 200, seed
        # labelled pixels are nearer muscle than fat on average (IMAT included)
        assert abs(np.median(hu[labels > 0]) - muscle_hu) < abs(np.median(hu[labels > 0]) - fat_hu)


def test_randomised_infiltration_is_drawn_as_pure_fat_and_as_partial_volume():
    """IMAT of fatty subjects shows at HU between fat and muscle, like a faint septum, and is
    labelled muscle: without such subjects a model leaves fatty muscle outside the groups."""
    subject = randomised.sample_subject(3)
    tissue = np.full((64, 64), randomised.Tissue.MUSCLE, dtype=np.int8)
    infiltrated = np.full(tissue.shape, 0.4, dtype=np.float32)
    geometry = Geometry(64, 100.0, np.zeros(1), np.zeros(1))
    muscle_hu = subject.appearance.hu[randomised.Tissue.MUSCLE]
    fat_hu = subject.appearance.hu[randomised.Tissue.FAT]
    third = (muscle_hu - fat_hu) / 3
    partial = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        hu = randomised._intensities(subject, tissue, infiltrated, rng, geometry)
        partial.append(float(((hu > fat_hu + third + 25) & (hu < muscle_hu - third)).mean()))
    assert min(partial) < 0.02, "some subjects have pure-fat marbling only"
    assert max(partial) > 0.08, "others show infiltration as partial volume"


def test_stress_generator_draws_every_group_on_both_legs_with_fat_between_groups():
    study = stress.generate(4000, size=192, slices=3)
    midline = study.labels.shape[2] // 2
    for group in MUSCLE_GROUPS:
        mask = study.labels == group
        assert mask[:, :, :midline].sum() > 100 and mask[:, :, midline:].sum() > 100, group
    labels = study.labels[1]
    # the pixels just outside group A on the side of group B (and vice versa) are mostly fat
    from scipy import ndimage

    extensor_rim = ndimage.binary_dilation(labels == Group.EXTENSOR, iterations=2) & (labels == 0)
    inside = ndimage.binary_erosion(labels > 0, iterations=1)
    muscle_hu = float(np.median(study.hu[1][inside]))
    between = extensor_rim & ndimage.binary_dilation(labels == Group.FLEXOR, iterations=3)
    assert between.sum() > 10
    assert float(np.median(study.hu[1][between])) < muscle_hu - 40


def test_stress_cohort_is_in_evaluate_and_respects_the_field_of_view():
    studies = list(cohorts.studies("stress", slices=2, size=96, limit=2, field_of_view=450.0))
    assert [s.subject.seed for s in studies] == [4000, 4001]
    assert all(s.geometry.field_of_view == 450.0 for s in studies)
    seeds = {name: set(c.seeds) for name, c in cohorts.COHORTS.items()}
    assert all(not (seeds["stress"] & other) for n, other in seeds.items() if n != "stress")


def test_nothing_that_trains_imports_the_stress_generator():
    for path in (ROOT / "thighseg" / "learning").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom | ast.Import)
            for alias in node.names
        } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any("stress" in name for name in imported), path
