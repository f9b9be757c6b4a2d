"""Two runs on the same questions: the exact McNemar test, the paired bootstrap, kept-set overlap.

Paired designs cancel the questions' own difficulty: both runs answer the same questions, so only the
questions where they disagree carry information about which is better. McNemar's exact test counts them
(first right and second wrong, and the reverse) and asks whether the split could be a fair coin's.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pore.stats.bootstrap import BootstrapSettings, Interval, bootstrap_mean


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs and the exact two-sided p-value."""

    only_first: int  # units the first run got right and the second wrong
    only_second: int  # units the second run got right and the first wrong
    p_value: float


def mcnemar_p_value(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value: 2 P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), at most 1.

    Computed with integers (no normal approximation, no continuity correction): with b = 1, c = 9 it is
    2 (1 + 10) / 2^10 = 0.021484375."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_first}, {only_second}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def mcnemar_exact(
    first_right: Sequence[bool] | np.ndarray, second_right: Sequence[bool] | np.ndarray
) -> McNemar:
    """McNemar's exact test on paired binary outcomes (one per unit, the same units in the same order)."""
    first, second = np.asarray(first_right, dtype=bool), np.asarray(second_right, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {first.shape} and {second.shape}")
    only_first, only_second = int((first & ~second).sum()), int((~first & second).sum())
    return McNemar(only_first, only_second, mcnemar_p_value(only_first, only_second))


def paired_mean_difference(
    first: Sequence[float] | np.ndarray,
    second: Sequence[float] | np.ndarray,
    settings: BootstrapSettings,
    units: Sequence[Hashable] | None = None,
    strata: Sequence[Hashable] | None = None,
) -> Interval:
    """mean(second) - mean(first) over the same questions, with a paired-bootstrap interval: each resample
    draws the same units for both runs (the mean of the per-question differences, resampled)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.shape} and {b.shape}")
    return bootstrap_mean(b - a, settings, units, strata)


def jaccard(first: Iterable[Hashable], second: Iterable[Hashable]) -> float:
    """|A & B| / |A | B| of two kept sets (1 when both are empty: they agree)."""
    a, b = set(first), set(second)
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union
