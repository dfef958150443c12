"""Statistics of a seeded comparison: mean and spread across training seeds, paired differences.

A study trains every arm (e.g. the EDM baseline and EDM-AOT) once per training seed, with the
same network, budget, data order and sampling seeds, so two arms trained with the same seed differ
only by the arm. The paired difference ``d_s = score(arm, s) - score(baseline, s)`` over the seeds
``s`` then removes the part of the seed noise the arms share; its mean, sample standard deviation
and Student-t confidence interval say whether "better" is better beyond the seed noise.
Lower scores are better (Frechet distances).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof = 1; nan for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    def text(self, digits: int = 3) -> str:
        """``"mean +- std"`` (just the mean for a single value)."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of ``values`` (at least one)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {values.shape}")
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return Spread(float(values.mean()), std, len(values))


@dataclass(frozen=True)
class PairedDifference:
    """Arm minus baseline over the seeds both have (negative: the arm scores lower = better).

    Attributes
    ----------
    mean, std : float
        Mean and sample standard deviation of the per-seed differences.
    n : int
        Number of paired seeds.
    low, high : float
        Two-sided Student-t confidence interval of the mean difference (nan for n < 2).
    p_value : float
        Two-sided paired t-test p-value (nan for n < 2 or identical differences).
    """

    mean: float
    std: float
    n: int
    low: float
    high: float
    p_value: float

    @property
    def verdict(self) -> str:
        """``"better"``, ``"worse"``, ``"no significant difference"`` or ``"too few seeds"``."""
        if self.n < 2 or math.isnan(self.low):
            return "too few seeds"
        if self.high < 0:
            return "better"
        if self.low > 0:
            return "worse"
        return "no significant difference"


def paired_difference(
    arm: Mapping[int, float], baseline: Mapping[int, float], *, confidence: float = CONFIDENCE
) -> PairedDifference:
    """Per-seed ``arm[s] - baseline[s]`` over the seeds in both mappings (seed -> score)."""
    seeds = sorted(set(arm) & set(baseline))
    if not seeds:
        raise ValueError(f"no common seeds: arm has {sorted(arm)}, baseline has {sorted(baseline)}")
    d = np.array([arm[s] - baseline[s] for s in seeds], dtype=float)
    s = spread(d)
    if s.n < 2:
        return PairedDifference(s.mean, s.std, s.n, math.nan, math.nan, math.nan)
    half = scipy.stats.t.ppf(0.5 + confidence / 2, df=s.n - 1) * s.std / math.sqrt(s.n)
    if s.std > 0:
        p_value = float(scipy.stats.ttest_1samp(d, 0.0).pvalue)
    else:  # every seed moved by exactly the same amount
        p_value = 0.0 if s.mean != 0 else 1.0
    return PairedDifference(s.mean, s.std, s.n, s.mean - half, s.mean + half, p_value)


def describe(arm: str, baseline: str, where: str, diff: PairedDifference, metric: str) -> str:
    """One plain sentence on ``diff`` (arm minus baseline at sampler point ``where``, e.g.
    ``"NFE 7, rho 7"``), for a results page."""
    change = f"{diff.mean:+.3f} {metric}"
    if diff.verdict == "too few seeds":
        return f"At {where}, {arm} vs {baseline}: {change} from a single seed (no spread)."
    ci = f"{CONFIDENCE:.0%} CI [{diff.low:+.3f}, {diff.high:+.3f}], {diff.n} seeds"
    if diff.verdict == "better":
        return f"At {where}, {arm} is better than {baseline}: {change} ({ci})."
    if diff.verdict == "worse":
        return f"At {where}, {arm} is worse than {baseline} here: {change} ({ci})."
    return (
        f"At {where}, no significant difference between {arm} and {baseline}: {change} "
        f"({ci}, within the seed noise)."
    )
