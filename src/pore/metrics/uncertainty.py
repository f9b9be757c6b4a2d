"""Intervals for every value a benchmark metric reports, and paired comparisons of two runs' values.

Both resample the metric's units (`pore.metrics.resampling`) and recompute the metric itself on each
resample; the percentile interval of the resampled values is the interval (`pore.stats.bootstrap`). A paired
comparison draws the same units for both runs, so the interval of the difference reflects only how the
runs differ on the same questions. For accuracy-type values (one right-or-wrong outcome per unit, averaged:
accuracy, POPE accuracy, MMBench's circular accuracy) the exact McNemar test is given as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pore.metrics.resampling import MetricParts
from pore.stats.bootstrap import BootstrapSettings, Interval, iter_draws, percentile_interval
from pore.stats.paired import McNemar, mcnemar_exact


def metric_intervals(parts: MetricParts, settings: BootstrapSettings) -> dict[str, Interval]:
    """{key: value and its bootstrap interval} for every key the metric computes."""
    estimate = parts.value()
    blocks = [parts.values_on(draws) for draws in iter_draws(parts.n_units, settings, parts.unit_stratum)]
    intervals = {}
    for key, value in estimate.items():
        low, high = percentile_interval(np.concatenate([block[key] for block in blocks]), settings.level)
        intervals[key] = Interval(value, float(low), float(high))
    return intervals


@dataclass(frozen=True)
class PairedDifference:
    """One value of two runs on the same questions: second - first, its paired interval, and McNemar's
    exact test when the value is accuracy-type (None otherwise)."""

    first: float
    second: float
    difference: Interval
    mcnemar: McNemar | None

    def distinguishable(self, level: float) -> bool:
        """Whether the data tell the difference from 0: McNemar's p below 1 - level for accuracy-type
        values (the exact test), else the paired interval excluding 0."""
        if self.mcnemar is not None:
            return self.mcnemar.p_value < 1.0 - level
        return self.difference.excludes(0.0)


def binary_outcomes(parts: MetricParts) -> dict[str, np.ndarray]:
    """{key: (U,) bool} for the accuracy-type keys: each unit alone scores 0 or 1, and the value over all
    units is their mean (so a unit is right or wrong, and the value counts the right ones)."""
    estimate, per_unit = parts.value(), parts.unit_values()
    outcomes = {}
    for key, values in per_unit.items():
        if key not in estimate or not np.all(np.isin(values, (0.0, 1.0))):
            continue
        if abs(float(values.mean()) - estimate[key]) <= 1e-9 * max(1.0, abs(estimate[key])):
            outcomes[key] = values.astype(bool)
    return outcomes


def paired_differences(
    first: MetricParts, second: MetricParts, settings: BootstrapSettings
) -> dict[str, PairedDifference]:
    """{key: PairedDifference} for every key both metrics compute. The runs must hold the same questions
    in the same order (the units and strata are the first run's)."""
    if first.size != second.size or not np.array_equal(first.unit_of, second.unit_of):
        raise ValueError("paired runs need the same questions, in the same order, with the same units")
    a, b = first.value(), second.value()
    keys = [key for key in a if key in b]
    resampled: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for draws in iter_draws(first.n_units, settings, first.unit_stratum):
        values_a, values_b = first.values_on(draws), second.values_on(draws)
        for key in keys:
            resampled[key].append(values_b[key] - values_a[key])
    outcomes_a, outcomes_b = binary_outcomes(first), binary_outcomes(second)
    results = {}
    for key in keys:
        low, high = percentile_interval(np.concatenate(resampled[key]), settings.level)
        test = None
        if key in outcomes_a and key in outcomes_b:
            test = mcnemar_exact(outcomes_a[key], outcomes_b[key])
        results[key] = PairedDifference(
            a[key], b[key], Interval(b[key] - a[key], float(low), float(high)), test
        )
    return results
