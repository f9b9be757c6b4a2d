"""Final numbers of a run, from the merged predictions: the benchmark's metric and the efficiency figures."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from pore.app.evaluation import predictions
from pore.app.evaluation.uncertainty import HIGH, LOW, Statistics, is_annotation, run_statistics
from pore.app.evaluation.writer import read_rank_stats
from pore.data import Benchmark
from pore.errors import UserError
from pore.metrics import METRICS

log = logging.getLogger("pore")
# Draws a run's pictures from its merged rows; returns {name: PNG path} (see pore.app.viz.run_figures).
FigureMaker = Callable[[list[dict[str, Any]]], dict[str, Path]]


def benchmark_metrics(benchmark: Benchmark, prefix: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    """`<prefix>/<metric>` for every value the benchmark's metric computes, plus sample counts."""
    answered = [row for row in rows if row.get("error") is None]
    results: dict[str, float] = {
        f"{prefix}/samples": float(len(answered)),
        f"{prefix}/failed": float(len(rows) - len(answered)),
    }
    if not answered:
        return results
    # Computed once, on rank 0, from the merged rows: no cross-rank synchronisation.
    metric = METRICS[benchmark.metric](sync_on_compute=False, **benchmark.metric_options())
    metric.update(
        [row["prediction"] for row in answered],
        [row["answers"] for row in answered],
        **benchmark.metric_extras([row.get("meta") or {} for row in answered]),
    )
    for key, value in metric.compute().items():
        results[f"{prefix}/{key}"] = float(value)
    return results


def efficiency_metrics(rows: list[dict[str, Any]], rank_stats: list[dict[str, Any]]) -> dict[str, float]:
    """Mean visual tokens, prefill TFLOPs and latency per sample; this run's throughput and peak memory."""
    answered = [row for row in rows if row.get("error") is None]
    results: dict[str, float] = {}
    if answered:
        results["eff/visual_tokens"] = fmean(row["n_visual_tokens"] for row in answered)
        results["eff/visual_tokens_before"] = fmean(row["n_visual_tokens_before"] for row in answered)
        results["eff/prefill_tflops"] = fmean(row["prefill_tflops"] for row in answered)
        results["eff/sec_per_sample"] = fmean(row["seconds"] for row in answered)
    if rank_stats:
        samples = sum(stat["samples"] for stat in rank_stats)
        seconds = max(stat["seconds"] for stat in rank_stats)
        if samples and seconds > 0:
            results["eff/samples_per_sec"] = samples / seconds
        memory = [stat["peak_memory_gb"] for stat in rank_stats if stat.get("peak_memory_gb") is not None]
        if memory:
            results["eff/peak_mem_gb"] = max(memory)
    return results


DEFAULT_MAX_FAILED = 0.05  # data.max_failed when a config has none (run folders written before it existed)
SHOWN_ERRORS = 3


class FailedSamplesError(UserError):
    """Too many samples of the run could not be run (or none was scored): its numbers would mislead."""


def max_failed_share(cfg: Any) -> float:
    share = cfg.data.get("max_failed") if cfg.get("data") is not None else None
    return DEFAULT_MAX_FAILED if share is None else float(share)


def failure_message(rows: list[dict[str, Any]], max_failed: float, output_dir: Path) -> str | None:
    """Why the run must fail: no sample scored, or more than `max_failed` of them failed; None if fine.
    The message gives the count and the first errors; the rows stay in predictions.jsonl."""
    failed = [row for row in rows if row.get("error") is not None]
    if rows and len(failed) <= max_failed * len(rows) and len(failed) < len(rows):
        return None
    shown = "; ".join(f"{row['question_id']}: {row['error']}" for row in failed[:SHOWN_ERRORS])
    more = ", ..." if len(failed) > SHOWN_ERRORS else ""
    where = f"the rows are in {output_dir / predictions.MERGED}"
    if not rows:
        return f"no sample was scored: the data gave no rows; {where}"
    head = (
        f"no sample was scored: all {len(rows)} samples failed"
        if len(failed) == len(rows)
        else f"{len(failed)} of {len(rows)} samples failed, more than data.max_failed={max_failed:g} of them"
    )
    return (
        f"{head} (first errors: {shown}{more}); fix the data (data.path, its image column) and run into "
        f"another output_dir, or allow more with data.max_failed; {where}"
    )


# Measured by the process that answered the questions; a rerun that answers none cannot measure them.
RUN_MEASUREMENTS = ("eff/samples_per_sec", "eff/peak_mem_gb")


def with_earlier_throughput(metrics: dict[str, float], earlier_path: Path) -> dict[str, float]:
    """`metrics`, plus the throughput and peak memory of the earlier run in `earlier_path` when this run
    measured none (a rerun of a finished run answers no question). A resumed run that answered some reports
    its own numbers over the questions it answered."""
    if "eff/samples_per_sec" in metrics or not earlier_path.exists():
        return metrics
    try:
        earlier = json.loads(earlier_path.read_text())
    except (OSError, ValueError):
        return metrics
    kept = {key: earlier[key] for key in RUN_MEASUREMENTS if key in earlier and key not in metrics}
    return {**metrics, **kept}


def summary_table(metrics: dict[str, float], title: str) -> str:
    """A text table of the final metrics: a value per line, its interval beside it when it has one."""
    shown = [key for key in metrics if not is_annotation(key)]
    width = max([len(key) for key in shown] + [len(title)])
    lines = [title, "-" * (width + 14)]
    if "ci/level" in metrics:
        lines.insert(1, f"[low, high]: {100 * metrics['ci/level']:.0f} % bootstrap intervals")
    for key in shown:
        line = f"{key:<{width}}  {metrics[key]:>12.4g}"
        if f"{key}/{LOW}" in metrics:
            line += f"  [{metrics[f'{key}/{LOW}']:.4g}, {metrics[f'{key}/{HIGH}']:.4g}]"
        lines.append(line)
    return "\n".join(lines)


class FinalMetrics(Callback):
    """At the end of predict (after the writer merged the ranks): metrics.json, and the loggers get them.

    It runs inside the Trainer's predict, before the loggers are finalised, so W&B and CSV keep the values.
    With `figures`, it then draws the run's pictures (PNG files; W&B also gets them as images). A picture
    that fails is logged and skipped: it never costs the metrics.
    """

    def __init__(
        self,
        benchmark: Benchmark,
        prefix: str,
        output_dir: str | Path,
        figures: FigureMaker | None = None,
        statistics: Statistics | None = None,
    ) -> None:
        self.benchmark, self.prefix, self.output_dir = benchmark, prefix, Path(output_dir)
        self.figures = figures
        # intervals and fidelity keys (pore.app.evaluation.uncertainty); None: the defaults
        self.statistics = statistics or Statistics()
        self.metrics: dict[str, float] | None = None
        self.rows: list[dict[str, Any]] = []  # the merged rows the metrics were computed from
        self.figure_paths: dict[str, Path] = {}

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = predictions.read_rows(self.output_dir / predictions.MERGED)
        self.rows = rows
        metrics = benchmark_metrics(self.benchmark, self.prefix, rows)
        metrics.update(efficiency_metrics(rows, read_rank_stats(self.output_dir)))
        metrics.update(run_statistics(self.benchmark, self.prefix, rows, self.statistics))
        path = self.output_dir / "metrics.json"
        metrics = with_earlier_throughput(metrics, path)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics(metrics)
            logger.save()
            if isinstance(logger, WandbLogger):
                # Offline runs keep their summary inside the binary .wandb file; a copy of metrics.json in the
                # run's files/ folder is readable without wandb (and is uploaded by `wandb sync`).
                logger.experiment.summary.update(metrics)
                shutil.copy(self.output_dir / "metrics.json", Path(logger.experiment.dir) / "metrics.json")
        self.metrics = metrics
        if self.figures is not None:
            self._draw(trainer, rows)

    def _draw(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> None:
        try:
            self.figure_paths = self.figures(rows)
        except Exception as error:  # pictures are a bonus: a broken one must not fail the run
            log.warning("could not draw the run's pictures: %s: %s", type(error).__name__, error)
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and self.figure_paths:
                names = sorted(self.figure_paths)
                for name in names:
                    logger.log_image(key=f"figures/{name}", images=[str(self.figure_paths[name])])
