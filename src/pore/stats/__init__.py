"""Statistics for defensible numbers: bootstrap intervals, paired comparisons, fidelity, seed spreads.

Pure functions of arrays (numpy; torch only for the first-token divergence), no knowledge of runs, files or
configs. `pore.metrics.resampling` applies them to the benchmark metrics; `pore.app` wires them into the
run's `metrics.json`, the summaries and `src/compare.py` (docs/statistics.md).
"""

from __future__ import annotations

from pore.stats.bootstrap import (
    BootstrapSettings,
    Interval,
    bootstrap_mean,
    bootstrap_means,
    draw_counts,
    draw_units,
    percentile_interval,
    unit_index,
)
from pore.stats.paired import McNemar, jaccard, mcnemar_exact, mcnemar_p_value, paired_mean_difference
from pore.stats.spread import Spread, spread

__all__ = [
    "BootstrapSettings",
    "Interval",
    "McNemar",
    "Spread",
    "bootstrap_mean",
    "bootstrap_means",
    "draw_counts",
    "draw_units",
    "jaccard",
    "mcnemar_exact",
    "mcnemar_p_value",
    "paired_mean_difference",
    "percentile_interval",
    "spread",
    "unit_index",
]
