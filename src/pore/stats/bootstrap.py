"""The nonparametric bootstrap over resampling units, vectorised.

A benchmark's score is computed over questions, but the questions are not always independent: MME scores an
image's two questions together (acc+), MMBench a question's circular copies together. The bootstrap therefore
resamples *units* (a question, or the group of questions the metric ties together) with replacement, and,
when the benchmark has fixed strata (MME's categories, POPE's subsets), within each stratum, so every
resample has the design of the benchmark. The interval is the percentile interval of the resampled values.

Draws are made in blocks of `BLOCK` resamples from one seeded generator, so a (seed, resamples) pair always
gives the same draws, whatever the data size, and memory stays at BLOCK x units.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

BLOCK = 256  # resamples drawn at once: (BLOCK, units) integers in memory


@dataclass(frozen=True)
class BootstrapSettings:
    """`resamples` (0: no intervals), the generator's `seed` and the interval's coverage `level`."""

    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 0:
            raise ValueError(
                f"bootstrap.resamples must be an integer >= 0 (0 = no intervals), got {self.resamples!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"bootstrap.seed must be an integer, got {self.seed!r}")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0 < self.level < 1:
            raise ValueError(
                f"bootstrap.level must be a number between 0 and 1 (e.g. 0.95), got {self.level!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.resamples > 0


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval [low, high]."""

    estimate: float
    low: float
    high: float

    def excludes(self, value: float = 0.0) -> bool:
        """Whether `value` lies outside the interval (for a difference: the data tell it from `value`)."""
        return bool(value < self.low or value > self.high)


def unit_index(units: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    """(n,) index of each question's unit, numbered in order of first appearance, and the number of units.

    `units` None: every question is its own unit."""
    if units is None:
        return np.arange(n), n
    if len(units) != n:
        raise ValueError(f"one unit per question is needed: {len(units)} units for {n} questions")
    numbers: dict[Hashable, int] = {}
    index = np.fromiter((numbers.setdefault(unit, len(numbers)) for unit in units), dtype=np.int64, count=n)
    return index, len(numbers)


def unit_strata(unit_of: np.ndarray, n_units: int, strata: Sequence[Hashable] | None) -> np.ndarray | None:
    """(U,) stratum number of each unit from the questions' strata; a unit must lie in one stratum."""
    if strata is None:
        return None
    question_stratum, _ = unit_index(strata, unit_of.size)
    per_unit = np.full(n_units, -1, dtype=np.int64)
    per_unit[unit_of] = question_stratum
    if np.any(per_unit[unit_of] != question_stratum):
        raise ValueError(
            "a resampling unit spans several strata: the questions of a unit must share a stratum"
        )
    return per_unit


def draw_units(
    n_units: int, resamples: int, rng: np.random.Generator, strata: np.ndarray | None = None
) -> np.ndarray:
    """(resamples, U) indices of the units drawn with replacement, column j drawn from the stratum of unit j
    (a stratified bootstrap: each stratum keeps its size); `strata` (U,) or None for one stratum."""
    if strata is None:
        return rng.integers(0, n_units, size=(resamples, n_units))
    draws = np.empty((resamples, n_units), dtype=np.int64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        draws[:, members] = members[rng.integers(0, members.size, size=(resamples, members.size))]
    return draws


def iter_draws(
    n_units: int, settings: BootstrapSettings, strata: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """The draws of `settings.resamples` resamples, in blocks of (<= BLOCK, U) unit indices."""
    rng = np.random.default_rng(settings.seed)
    for start in range(0, settings.resamples, BLOCK):
        yield draw_units(n_units, min(BLOCK, settings.resamples - start), rng, strata)


def draw_counts(draws: np.ndarray, n_units: int) -> np.ndarray:
    """(R, U) how many times each unit was drawn in each resample, from (R, U') drawn indices."""
    resamples = draws.shape[0]
    flat = draws + np.arange(resamples, dtype=np.int64)[:, None] * n_units
    return np.bincount(flat.ravel(), minlength=resamples * n_units).reshape(resamples, n_units)


def percentile_interval(resampled: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles over the first axis (resamples); NaN ignored."""
    tail = (1.0 - level) / 2.0
    low, high = np.nanquantile(np.asarray(resampled, dtype=np.float64), [tail, 1.0 - tail], axis=0)
    return low, high


def bootstrap_means(
    values: np.ndarray,
    settings: BootstrapSettings,
    units: Sequence[Hashable] | None = None,
    strata: Sequence[Hashable] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means over the last axis of `values` (S, n) (or (n,)) and their bootstrap intervals: (estimate, low,
    high), each (S,) (or scalars).

    Every row is resampled with the same draws (a row may be a run, a seed, a simulated data set). The mean
    of a resample is the mean over the questions of its drawn units (a unit drawn twice counts twice), i.e.
    sum of unit sums / sum of unit sizes.
    """
    array = np.asarray(values, dtype=np.float64)
    single = array.ndim == 1
    array = np.atleast_2d(array)
    n = array.shape[1]
    if n == 0:
        raise ValueError("no values to resample")
    unit_of, n_units = unit_index(units, n)
    unit_sums = np.zeros((array.shape[0], n_units))
    np.add.at(unit_sums.T, unit_of, array.T)
    unit_sizes = np.bincount(unit_of, minlength=n_units).astype(np.float64)
    unit_stratum = unit_strata(unit_of, n_units, strata)
    blocks = []
    for draws in iter_draws(n_units, settings, unit_stratum):
        counts = draw_counts(draws, n_units).astype(np.float64)  # (r, U)
        blocks.append((counts @ unit_sums.T) / (counts @ unit_sizes)[:, None])  # (r, S)
    estimate = array.mean(axis=1)
    low, high = percentile_interval(np.concatenate(blocks), settings.level)
    if single:
        return estimate[0], low[0], high[0]
    return estimate, low, high


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    settings: BootstrapSettings,
    units: Sequence[Hashable] | None = None,
    strata: Sequence[Hashable] | None = None,
) -> Interval:
    """The mean of `values` (n,) with its bootstrap interval over `units` (within `strata`)."""
    estimate, low, high = bootstrap_means(np.asarray(values, dtype=np.float64), settings, units, strata)
    return Interval(float(estimate), float(low), float(high))
