"""Statistics of a seeded comparison: mean and spread across training seeds, paired differences.

A study trains every arm (e.g. the EDM baseline and EDM-AOT) once per training seed, with the
same network, budget, data order and sampling seeds, so two arms trained with the same seed differ
only by the arm. The paired difference ``d_s = score(arm, s) - score(baseline, s)`` over the seeds
``s`` then removes the part of the seed noise the arms share; its mean, sample standard deviation
and Student-t confidence interval say whether "better" is better beyond the seed noise.
Lower scores are better (Frechet distances).
"""

from __future__ import annotations

import enum
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


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of ``values`` (at least one)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {values.shape}")
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return Spread(float(values.mean()), std, len(values))


class Verdict(enum.Enum):
    """What the paired interval of arm minus baseline says; the value is its name in the study
    page's table and summary."""

    BETTER = "better"  # the whole interval is below 0: the arm scores lower
    WORSE = "worse"  # the whole interval is above 0
    NO_DIFFERENCE = "no significant difference"  # the interval contains 0
    TOO_FEW_SEEDS = "too few seeds"  # one paired seed: no interval


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
    def verdict(self) -> Verdict:
        """Where the interval lies against 0."""
        if self.n < 2 or math.isnan(self.low):
            return Verdict.TOO_FEW_SEEDS
        if self.high < 0:
            return Verdict.BETTER
        if self.low > 0:
            return Verdict.WORSE
        return Verdict.NO_DIFFERENCE


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


class Shape(enum.Enum):
    """Shape of an arm's paired differences across NFE at one sampler schedule (see `pattern`)."""

    TOO_FEW_SEEDS = enum.auto()
    NO_DIFFERENCE = enum.auto()
    WORSE = enum.auto()
    MIXED = enum.auto()  # better at some NFE, worse at another
    BETTER_EVERYWHERE = enum.auto()
    GAIN_SHRINKS = enum.auto()  # better at the lowest NFEs only, as in the paper
    BETTER_SOMEWHERE = enum.auto()  # better at some NFEs that are not the lowest


def pattern(diffs: Mapping[int, PairedDifference]) -> Shape:
    """Shape of arm-minus-baseline differences keyed by NFE.

    ``GAIN_SHRINKS``: significantly better at the lowest NFEs, no significant difference at every
    higher one (never worse); ``BETTER_SOMEWHERE``: better at some NFEs that are not the lowest.
    """
    if not diffs:
        raise ValueError("diffs must hold at least one NFE")
    verdicts = [diffs[nfe].verdict for nfe in sorted(diffs)]
    if Verdict.TOO_FEW_SEEDS in verdicts:
        return Shape.TOO_FEW_SEEDS
    better, worse = Verdict.BETTER in verdicts, Verdict.WORSE in verdicts
    if better and worse:
        return Shape.MIXED
    if worse:
        return Shape.WORSE
    if not better:
        return Shape.NO_DIFFERENCE
    if all(v is Verdict.BETTER for v in verdicts):
        return Shape.BETTER_EVERYWHERE
    # Better somewhere, so better before the first other verdict when none follows it.
    first_other = next(i for i, v in enumerate(verdicts) if v is not Verdict.BETTER)
    shrinks = Verdict.BETTER not in verdicts[first_other:]
    return Shape.GAIN_SHRINKS if shrinks else Shape.BETTER_SOMEWHERE
