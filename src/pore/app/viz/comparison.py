"""Pictures that compare runs: kept tokens by image row as one curve per run, and Pareto fronts.

Fixed pixel sizes, as the other figures (`pore.app.viz.figures`): `KEPT_ROWS_SIZE`, and `pareto_size`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pore.app.viz.figures import COLOURS, KeptSummary, _figure, _save

# A Pareto point is any object with `label`, `benchmark`, `key`, `value`, `low`, `high`, `tflops`,
# `prefill_ms`, `front_tflops`, `front_time` (pore.app.comparison.pareto.Point: the pictures import nothing
# from the comparison layer, which imports them).
Point = Any

KEPT_ROWS_SIZE = (860, 460)
PARETO_PANEL = (640, 480)


def plot_kept_rows(runs: Sequence[KeptSummary], path: str | Path) -> Path:
    """Share of each run's kept tokens in each image row, one curve per run (rows as a fraction of the
    image's height when the runs' grids differ), against the uniform share: how far a prior moved the
    selection up or down."""
    figure = _figure(*KEPT_ROWS_SIZE)
    axes = figure.add_subplot(1, 1, 1)
    same_grid = len({run.grid_h for run in runs}) == 1
    for index, run in enumerate(runs):
        rows = np.arange(run.grid_h)
        x = rows if same_grid else (rows + 0.5) / run.grid_h
        label = f"{textwrap.shorten(run.label, 60)}: mean row {run.mean_row:.2f}"
        colour = COLOURS[index % len(COLOURS)]
        axes.plot(x, 100 * run.row_share, marker="o", lw=2, color=colour, label=label)
    if same_grid:
        grid_h = runs[0].grid_h
        axes.axhline(100 / grid_h, color="black", lw=1, ls="--", label=f"uniform ({100 / grid_h:.1f} %)")
        axes.set_xlabel("image row (0 = top)")
        axes.set_xticks(range(0, grid_h, max(1, round(grid_h / 24))))
    else:
        axes.set_xlabel("row position in the image (0 = top, 1 = bottom)")
    axes.set_ylabel("share of kept image tokens (%)")
    axes.set_ylim(bottom=0)
    axes.set_title("Kept tokens by image row, per run", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def pareto_size(benchmarks: int, timed: bool) -> tuple[int, int]:
    return PARETO_PANEL[0] * (2 if timed else 1), PARETO_PANEL[1] * benchmarks


def _panel(axes, points: Sequence[Point], cost: str, front: str, xlabel: str) -> None:
    """One benchmark against one cost: every run with its interval, the front filled and joined."""
    shown = [p for p in points if getattr(p, cost) is not None]
    for index, point in enumerate(shown):
        on = getattr(point, front)
        error = None
        if point.low is not None and point.high is not None:
            error = [[max(point.value - point.low, 0.0)], [max(point.high - point.value, 0.0)]]
        colour = COLOURS[0] if on else "#7f7f7f"
        axes.errorbar(
            [getattr(point, cost)],
            [point.value],
            yerr=error,
            fmt="o",
            ms=7,
            capsize=3,
            color=colour,
            mfc=colour if on else "white",
            zorder=3 if on else 2,
        )
        axes.annotate(
            textwrap.shorten(point.label, 32),
            (getattr(point, cost), point.value),
            textcoords="offset points",
            xytext=(5, 4 + 6 * (index % 2)),
            fontsize=7,
        )
    ordered = sorted((p for p in shown if getattr(p, front)), key=lambda p: getattr(p, cost))
    if ordered:
        xs, ys = [getattr(p, cost) for p in ordered], [p.value for p in ordered]
        axes.step(xs, ys, where="post", color=COLOURS[0], lw=1.5, alpha=0.7, label="Pareto front")
        axes.legend(fontsize=8, loc="lower right")
    axes.set_xlabel(xlabel)
    axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes.set_ylabel(f"{points[0].key} (bars: bootstrap interval)")
    axes.grid(alpha=0.3)


def plot_pareto(points: Sequence[Point], path: str | Path) -> Path:
    """Accuracy against prefill TFLOPs per sample (and against measured prefill time when the points have
    it), one row of panels per benchmark, one marker per run; the front is filled and joined."""
    if not points:
        raise ValueError("no run to draw")
    benchmarks = sorted({point.benchmark for point in points})
    timed = any(point.prefill_ms is not None for point in points)
    figure = _figure(*pareto_size(len(benchmarks), timed))
    grid = figure.subplots(len(benchmarks), 2 if timed else 1, squeeze=False)
    for row, benchmark in enumerate(benchmarks):
        group = [point for point in points if point.benchmark == benchmark]
        _panel(grid[row][0], group, "tflops", "front_tflops", "prefill TFLOPs per sample")
        grid[row][0].set_title(f"{benchmark}: {len(group)} runs", fontsize=10)
        if timed:
            _panel(grid[row][1], group, "prefill_ms", "front_time", "measured prefill (ms, bench report)")
            grid[row][1].set_title(f"{benchmark}: against measured time", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
