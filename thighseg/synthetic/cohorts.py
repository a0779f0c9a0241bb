"""Phantom cohorts split by subject (seed), as in a real study: no subject is in two cohorts.

The external cohort comes from a different synthetic "institution" (phantom.EXTERNAL), mimicking
the paper's second hospital. Both are drawn by the generator the models were trained on. The
stress cohort comes from `thighseg.synthetic.stress`, a generator built differently and never
used in training or tuning: the only figures here that say something about unseen anatomy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from thighseg.synthetic import phantom, stress


@dataclass(frozen=True)
class Cohort:
    name: str
    seeds: range
    site: phantom.Site


COHORTS = {
    "train": Cohort("train", range(1000, 1036), phantom.INTERNAL),
    "validation": Cohort("validation", range(1036, 1040), phantom.INTERNAL),
    "internal_test": Cohort("internal_test", range(2000, 2010), phantom.INTERNAL),
    "external": Cohort("external", range(3000, 3010), phantom.EXTERNAL),
    "stress": Cohort("stress", range(4000, 4020), phantom.INTERNAL),
}


def studies(
    cohort: str,
    slices: int = 24,
    size: int = 512,
    limit: int | None = None,
    field_of_view: float | None = None,
) -> Iterator[phantom.Phantom]:
    """Phantoms of a cohort; evaluation cohorts use each site's slice spacing around mid-thigh."""
    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; choose one of {', '.join(COHORTS)}")
    spec = COHORTS[cohort]
    if cohort == "stress":
        for seed in list(spec.seeds)[:limit]:
            yield stress.generate(seed, size=size, slices=slices, field_of_view=field_of_view)
        return
    spacing = None if cohort in ("train", "validation") else spec.site.slice_spacing_mm
    for seed in list(spec.seeds)[:limit]:
        yield phantom.generate(
            seed,
            size=size,
            slices=slices,
            field_of_view=field_of_view,
            slice_spacing=spacing,
            site=spec.site,
        )
