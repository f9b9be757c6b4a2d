"""Pareto fronts of accuracy against cost, from the runs of a multirun or sweep folder.

One point per run (a strategy x budget): its headline value with its bootstrap interval against its prefill
TFLOPs per sample and, when a speed benchmark report (`src/bench.py`) of the same model is given, against
the measured prefill time of that strategy and budget. A point is on the front when no other run of the
same benchmark is at least as accurate and at most as costly, and better in one of the two.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pore.app.comparison.runs import RunResult
from pore.app.evaluation.uncertainty import HIGH, LOW, headline_key, interval_key
from pore.errors import UserError
from pore.metrics.uncertainty import metric_intervals
from pore.stats.bootstrap import BootstrapSettings

log = logging.getLogger("pore")


@dataclass
class Point:
    label: str
    benchmark: str
    key: str  # the metric key, with the benchmark prefix
    value: float
    low: float | None
    high: float | None
    tflops: float | None  # prefill TFLOPs per sample (eff/prefill_tflops)
    prefill_ms: float | None  # measured by the speed benchmark, when a report is given
    path: Path
    front_tflops: bool = False
    front_time: bool = False


def resolve_metric(run: RunResult, metric: str | None) -> str:
    """The full key of `metric` for this run (`acc` -> `<benchmark>/acc`), or its headline key."""
    if metric:
        return metric if "/" in metric else f"{run.benchmark_name}/{metric}"
    key = headline_key(run.metrics)
    if key is None:
        key = f"{run.benchmark_name}/{next(iter(run.parts().value()))}"
    return key


def run_point(run: RunResult, metric: str | None, settings: BootstrapSettings) -> Point:
    key = resolve_metric(run, metric)
    value = run.metrics.get(key)
    low, high = run.metrics.get(interval_key(key, LOW)), run.metrics.get(interval_key(key, HIGH))
    if value is None or (low is None and settings.enabled):  # an older run, or metrics.json without intervals
        short, reported = key.removeprefix(f"{run.benchmark_name}/"), run.parts().value()
        if short not in reported:
            raise UserError(f"{run.path} has no metric {key!r}; its metric reports {sorted(reported)}")
        value = reported[short]
        if settings.enabled:
            interval = metric_intervals(run.parts(), settings)[short]
            low, high = interval.low, interval.high
    return Point(
        run.label,
        run.benchmark_name,
        key,
        float(value),
        low,
        high,
        run.metrics.get("eff/prefill_tflops"),
        None,
        run.path,
    )


def on_front(values: list[float], costs: list[float | None]) -> list[bool]:
    """Which points are Pareto-optimal (maximise value, minimise cost); a point without a cost is not."""
    front = []
    for i, (value, cost) in enumerate(zip(values, costs, strict=True)):
        if cost is None:
            front.append(False)
            continue
        dominated = any(
            j != i
            and other is not None
            and values[j] >= value
            and other <= cost
            and (values[j] > value or other < cost)
            for j, other in enumerate(costs)
        )
        front.append(not dominated)
    return front


def bench_times(report: dict[str, Any], batch: int | None = None) -> dict[tuple[str, int | None], float]:
    """{(strategy, keep): prefill ms} of a speed-benchmark report (`src/bench.py`, schema pore.bench/1) at one
    batch size (default the smallest) and backend (the first measured); ("none", None): unpruned."""
    rows = [row for row in report.get("comparisons", []) if row.get("status") == "ok"]
    if not rows:
        return {}
    batch = min(row["batch"] for row in rows) if batch is None else batch
    backend = next((row["implementation"] for row in rows if row["batch"] == batch), None)
    chosen = [row for row in rows if row["batch"] == batch and row["implementation"] == backend]
    times: dict[tuple[str, int | None], float] = {
        (row["strategy"], row["budget"]): row["prefill_ms"] for row in chosen
    }
    if chosen and chosen[0].get("unpruned_ms") is not None:
        times[("none", None)] = chosen[0]["unpruned_ms"]
    return times


def attach_times(points: list[Point], runs: list[RunResult], report_path: Path, batch: int | None) -> None:
    """Fill `prefill_ms` from a bench report for the runs of the report's model."""
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the bench report {report_path}: {error}") from None
    model = (report.get("model") or {}).get("name")
    times = bench_times(report, batch)
    for point, run in zip(points, runs, strict=True):
        if str(run.config.model.name) != model:
            continue
        keep = run.config.strategy.get("keep")
        name = str(run.config.strategy.name) if run.prunes else "none"
        point.prefill_ms = times.get((name, None if name == "none" else keep))
    if not any(point.prefill_ms is not None for point in points):
        log.warning(
            "the bench report %s (model %s) times none of these runs' strategy x budget", report_path, model
        )


def pareto_points(
    runs: list[RunResult],
    settings: BootstrapSettings,
    metric: str | None = None,
    bench: Path | None = None,
    bench_batch: int | None = None,
) -> list[Point]:
    """One point per run, the fronts marked per benchmark."""
    points = [run_point(run, metric, settings) for run in runs]
    if bench is not None:
        attach_times(points, runs, bench, bench_batch)
    for benchmark in {point.benchmark for point in points}:
        group = [point for point in points if point.benchmark == benchmark]
        values = [point.value for point in group]
        for point, front in zip(group, on_front(values, [p.tflops for p in group]), strict=True):
            point.front_tflops = front
        for point, front in zip(group, on_front(values, [p.prefill_ms for p in group]), strict=True):
            point.front_time = front
    return points


COLUMNS = (
    "benchmark",
    "run",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "prefill_tflops",
    "prefill_ms",
    "front_tflops",
    "front_time",
    "output_dir",
)


def table_rows(points: list[Point]) -> list[dict[str, Any]]:
    ordered = sorted(
        points, key=lambda p: (p.benchmark, p.tflops if p.tflops is not None else float("inf"), -p.value)
    )
    return [
        dict(
            zip(
                COLUMNS,
                (
                    p.benchmark,
                    p.label,
                    p.key,
                    p.value,
                    p.low,
                    p.high,
                    p.tflops,
                    p.prefill_ms,
                    p.front_tflops,
                    p.front_time,
                    str(p.path),
                ),
                strict=True,
            )
        )
        for p in ordered
    ]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(points: list[Point]) -> str:
    """The table beside the figure: one row per run, cheapest first, the front marked."""
    timed = any(point.prefill_ms is not None for point in points)
    shown = [c for c in COLUMNS if c != "output_dir" and (timed or c not in ("prefill_ms", "front_time"))]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in shown) + " |" for row in table_rows(points)]
    return "\n".join(lines) + "\n"


def write_pareto(points: list[Point], out: Path) -> dict[str, Path]:
    """pareto.png (the figure), pareto.md and pareto.csv (the table) in `out`."""
    from pore.app.viz.comparison import plot_pareto

    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "figure": plot_pareto(points, out / "pareto.png"),
        "table": out / "pareto.md",
        "csv": out / "pareto.csv",
    }
    paths["table"].write_text(markdown(points))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table_rows(points))
    return paths
