"""Agreement statistics for volumes and overlap (pure numpy/scipy)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class ICC:
    """ICC(2,1): two-way random effects, absolute agreement, single measurement (Shrout & Fleiss
    1979; McGraw & Wong 1996, case 2A), with its F-based 95 % confidence interval."""

    value: float
    ci_low: float
    ci_high: float
    subjects: int

    def as_dict(self) -> dict:
        return asdict(self)


def icc_2_1(ratings: np.ndarray, confidence: float = 0.95) -> ICC:
    """ratings: (subjects, raters), e.g. column 0 manual (truth), column 1 automatic."""
    x = np.asarray(ratings, dtype=float)
    n, k = x.shape
    if n < 3 or k < 2:
        raise ValueError(f"ICC needs at least 3 subjects and 2 raters, got {x.shape}")
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc, mse = ss_rows / (n - 1), ss_cols / (k - 1), ss_error / ((n - 1) * (k - 1))
    value = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    alpha = 1 - confidence
    a, b = k * value / (n * (1 - value)), 1 + k * value * (n - 1) / (n * (1 - value))
    v = (a * msc + b * mse) ** 2 / ((a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1)))
    f_low, f_high = stats.f.ppf(1 - alpha / 2, n - 1, v), stats.f.ppf(1 - alpha / 2, v, n - 1)
    low = n * (msr - f_low * mse) / (f_low * (k * msc + (k * n - k - n) * mse) + n * msr)
    high = n * (f_high * msr - mse) / (k * msc + (k * n - k - n) * mse + n * f_high * msr)
    return ICC(float(value), float(low), float(high), n)


@dataclass(frozen=True)
class BlandAltman:
    mean_difference: float
    lower_limit: float
    upper_limit: float

    def as_dict(self) -> dict:
        return asdict(self)


def bland_altman(reference: np.ndarray, measured: np.ndarray) -> BlandAltman:
    """Bias and 95 % limits of agreement of measured - reference."""
    difference = np.asarray(measured, float) - np.asarray(reference, float)
    bias, sd = float(difference.mean()), float(difference.std(ddof=1))
    return BlandAltman(bias, bias - 1.96 * sd, bias + 1.96 * sd)


def mean_sd(values) -> dict[str, float]:
    array = np.asarray(list(values), float)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0}
