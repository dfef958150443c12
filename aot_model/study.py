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


# Shapes of an arm's paired differences across NFE at one schedule (see `pattern`).
TOO_FEW_SEEDS = "too few seeds"
NO_DIFFERENCE = "no significant difference"
WORSE = "worse"
MIXED = "mixed"
BETTER_EVERYWHERE = "better everywhere"
GAIN_SHRINKS = "gain shrinks"  # better at the lowest NFEs only, as in the paper
BETTER_SOMEWHERE = "better at some NFE"


def pattern(diffs: Mapping[int, PairedDifference]) -> str:
    """Shape of arm-minus-baseline differences keyed by NFE: one of the constants above.

    ``GAIN_SHRINKS``: significantly better at the lowest NFEs, no significant difference at every
    higher one (never worse); ``BETTER_SOMEWHERE``: better at some NFEs that are not the lowest.
    """
    if not diffs:
        raise ValueError("diffs must hold at least one NFE")
    verdicts = [diffs[nfe].verdict for nfe in sorted(diffs)]
    if TOO_FEW_SEEDS in verdicts:
        return TOO_FEW_SEEDS
    better, worse = "better" in verdicts, "worse" in verdicts
    if better and worse:
        return MIXED
    if worse:
        return WORSE
    if not better:
        return NO_DIFFERENCE
    if all(v == "better" for v in verdicts):
        return BETTER_EVERYWHERE
    first_other = next(i for i, v in enumerate(verdicts) if v != "better")
    shrinks = first_other > 0 and "better" not in verdicts[first_other:]
    return GAIN_SHRINKS if shrinks else BETTER_SOMEWHERE


def _nfes(nfes: Sequence[int]) -> str:
    """``"5, 7 and 11"``."""
    names = [str(n) for n in sorted(nfes)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def trend(arm: str, baseline: str, diffs: Mapping[int, PairedDifference], where: str) -> str:
    """One plain sentence on ``arm`` vs ``baseline`` across every NFE in ``diffs`` (keys), at one
    sampler schedule ``where`` (e.g. ``"rho 7"``), following :func:`pattern`."""
    shape = pattern(diffs)
    by = {v: [nfe for nfe, d in diffs.items() if d.verdict == v] for v in ("better", "worse")}
    rest = [nfe for nfe, d in diffs.items() if d.verdict == "no significant difference"]
    also = f"; no significant difference at NFE {_nfes(rest)}" if rest else ""
    if shape == TOO_FEW_SEEDS:
        return (
            f"{arm} vs {baseline} ({where}): too few training seeds for a paired interval, so "
            "nothing can be said beyond the seed noise."
        )
    if shape == NO_DIFFERENCE:
        return (
            f"No significant difference between {arm} and {baseline} at any NFE ({where}, NFE "
            f"{_nfes(diffs)}): every paired {CONFIDENCE:.0%} interval contains 0."
        )
    if shape == WORSE:
        return (
            f"AOT is worse here: {arm} scores worse than {baseline} at NFE {_nfes(by['worse'])} "
            f"({where}){also}."
        )
    if shape == MIXED:
        return (
            f"Mixed ({where}): {arm} is better than {baseline} at NFE {_nfes(by['better'])}, but "
            f"AOT is worse here at NFE {_nfes(by['worse'])}{also}."
        )
    if shape == BETTER_EVERYWHERE:
        return f"{arm} is better than {baseline} at every NFE ({where}, NFE {_nfes(diffs)})."
    if shape == GAIN_SHRINKS:
        return (
            f"{arm} is better than {baseline} at NFE {_nfes(by['better'])} only ({where}); at "
            f"NFE {_nfes(rest)} there is no significant difference: the gain vanishes with more "
            "steps."
        )
    return f"{arm} is better than {baseline} at NFE {_nfes(by['better'])} only ({where}){also}."
