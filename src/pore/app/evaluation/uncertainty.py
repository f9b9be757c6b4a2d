"""A run's statistics in its `metrics.json`: intervals beside every metric, fidelity to the unpruned model.

Keys written (docs/statistics.md):

- `<data>/<metric>/ci_low`, `<data>/<metric>/ci_high`: the bootstrap interval of every benchmark value, over
  the metric's units (`pore.metrics.resampling`), and `ci/resamples`, `ci/seed`, `ci/level`;
- `fid/first_token_kl`, `fid/first_token_top1` (with `fidelity=true`): mean over questions of the KL
  divergence from the unpruned to the pruned model's first-token distribution, and of their top-1 agreement;
- `fid/answer_agreement` (with `fidelity_reference=<unpruned run>`): share of questions whose answer equals
  the unpruned run's (case and punctuation ignored); each with its interval, and `fid/samples`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pore.app.evaluation import predictions
from pore.data import Benchmark
from pore.errors import UserError
from pore.metrics import METRICS, normalize_exact
from pore.metrics.resampling import MetricParts, metric_parts
from pore.metrics.uncertainty import metric_intervals
from pore.stats.bootstrap import BootstrapSettings, Interval, bootstrap_mean

log = logging.getLogger("pore")

LOW, HIGH = "ci_low", "ci_high"  # suffixes of an interval's keys: <key>/ci_low, <key>/ci_high
FIDELITY = "fid"  # prefix of the fidelity keys
KL_COLUMN, TOP1_COLUMN = "first_token_kl", "first_token_top1"  # predictions.jsonl, with fidelity=true


@dataclass(frozen=True)
class Statistics:
    """The run's statistics settings (config keys `bootstrap.*`, `fidelity`, `fidelity_reference`)."""

    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    fidelity: bool = False
    reference: Path | None = None


def statistics_settings(cfg: DictConfig) -> Statistics:
    """The settings, checked (a `UserError` naming the setting): before the weights load."""
    node = OmegaConf.select(cfg, "bootstrap", default=None) or {}
    try:
        bootstrap = BootstrapSettings(
            resamples=node.get("resamples", 1000), seed=node.get("seed", 0), level=node.get("level", 0.95)
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    fidelity = OmegaConf.select(cfg, "fidelity", default=False)
    if not isinstance(fidelity, bool):
        raise UserError(f"fidelity must be true or false, got {fidelity!r}")
    reference = OmegaConf.select(cfg, "fidelity_reference", default=None)
    if reference is not None:
        reference = Path(str(reference))
        if not (reference / predictions.MERGED).exists():
            raise UserError(
                f"fidelity_reference {str(reference)!r} holds no {predictions.MERGED}: give the output_dir "
                "of a finished unpruned run (python src/run.py strategy=none ...)"
            )
        check_reference_data(cfg, reference)
    return Statistics(bootstrap, fidelity, reference)


def check_reference_data(cfg: DictConfig, reference: Path) -> None:
    """The reference run answered the same benchmark (its config.yaml's data.name), or a `UserError`."""
    saved = reference / "config.yaml"
    if not saved.exists():
        return
    theirs = OmegaConf.select(OmegaConf.load(saved), "data.name", default=None)
    ours = OmegaConf.select(cfg, "data.name", default=None)
    if theirs is not None and str(theirs) != str(ours):
        raise UserError(
            f"fidelity_reference {str(reference)!r} ran data={theirs}, this run data={ours}: give the "
            "unpruned run of the same benchmark"
        )


def interval_key(key: str, side: str) -> str:
    return f"{key}/{side}"


SEED_SPREAD = ("seed_sd", "seed_min", "seed_max")  # suffixes of a seeds run's spread: <key>/seed_sd, ...


def is_annotation(key: str) -> bool:
    """Whether a metrics.json key annotates another (an interval bound, a spread over seeds, a setting)
    rather than being a value of its own."""
    suffixes = tuple(f"/{suffix}" for suffix in (LOW, HIGH, *SEED_SPREAD))
    return key.endswith(suffixes) or key.startswith(("ci/", "seeds/"))


def headline_key(metrics: dict[str, Any]) -> str | None:
    """The benchmark's headline value in a metrics.json: its metric's first key after the sample counts
    (report.py writes the benchmark's keys first); None when there is none."""
    for key in metrics:
        if key.startswith(("eff/", f"{FIDELITY}/")) or is_annotation(key):
            continue
        if not key.endswith(("/samples", "/failed")):
            return key
    return None


def _answered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row.get("error") is None]


def benchmark_parts(benchmark: Benchmark, rows: Sequence[dict[str, Any]]) -> MetricParts | None:
    """The benchmark's metric over the answered rows, split for resampling (None without answers)."""
    answered = _answered(rows)
    if not answered:
        return None
    metas = [row.get("meta") or {} for row in answered]
    metric = METRICS[benchmark.metric](sync_on_compute=False, **benchmark.metric_options())
    return metric_parts(
        metric,
        benchmark.metric,
        [row["prediction"] for row in answered],
        [row["answers"] for row in answered],
        benchmark.metric_extras(metas),
        metas,
    )


def flatten(intervals: dict[str, Interval], prefix: str) -> dict[str, float]:
    values = {}
    for key, interval in intervals.items():
        values[interval_key(f"{prefix}/{key}", LOW)] = interval.low
        values[interval_key(f"{prefix}/{key}", HIGH)] = interval.high
    return values


def interval_metrics(
    benchmark: Benchmark, prefix: str, rows: Sequence[dict[str, Any]], settings: BootstrapSettings
) -> dict[str, float]:
    """`<prefix>/<key>/ci_low|ci_high` for every value of the benchmark's metric, and the settings used."""
    parts = benchmark_parts(benchmark, rows)
    if parts is None or not settings.enabled:
        return {}
    values = flatten(metric_intervals(parts, settings), prefix)
    return {**values, **settings_keys(settings)}


def settings_keys(settings: BootstrapSettings) -> dict[str, float]:
    return {
        "ci/resamples": float(settings.resamples),
        "ci/seed": float(settings.seed),
        "ci/level": settings.level,
    }


def answers_agree(first: str | None, second: str | None) -> bool:
    """Two answers are the same answer: equal after `normalize_exact` (case, punctuation, articles)."""
    return first is not None and second is not None and normalize_exact(first) == normalize_exact(second)


def agreement(rows: Sequence[dict[str, Any]], reference_rows: Sequence[dict[str, Any]]) -> list[float]:
    """1 / 0 per question answered in both runs (in the order of `rows`): the answers agree."""
    reference = {row["question_id"]: row for row in _answered(reference_rows)}
    return [
        float(answers_agree(row["prediction"], reference[row["question_id"]]["prediction"]))
        for row in _answered(rows)
        if row["question_id"] in reference
    ]


def _mean_keys(name: str, values: list[float], settings: BootstrapSettings) -> dict[str, float]:
    if not values:
        return {}
    if not settings.enabled:
        return {name: sum(values) / len(values)}
    interval = bootstrap_mean(values, settings)
    return {
        name: interval.estimate,
        interval_key(name, LOW): interval.low,
        interval_key(name, HIGH): interval.high,
    }


def fidelity_metrics(rows: Sequence[dict[str, Any]], statistics: Statistics) -> dict[str, float]:
    """The `fid/*` keys this run can give: first-token KL and top-1 agreement (rows written with
    fidelity=true), answer agreement with the reference run; empty when neither applies."""
    answered = [row for row in _answered(rows) if row.get(KL_COLUMN) is not None]
    results: dict[str, float] = {}
    settings = statistics.bootstrap
    if answered:
        results[f"{FIDELITY}/samples"] = float(len(answered))
        results.update(
            _mean_keys(f"{FIDELITY}/{KL_COLUMN}", [float(row[KL_COLUMN]) for row in answered], settings)
        )
        top1 = [float(bool(row[TOP1_COLUMN])) for row in answered]
        results.update(_mean_keys(f"{FIDELITY}/{TOP1_COLUMN}", top1, settings))
    if statistics.reference is not None:
        agree = agreement(rows, predictions.all_rows(statistics.reference))
        if not agree:
            log.warning("fidelity_reference %s answered none of this run's questions", statistics.reference)
        results.update(_mean_keys(f"{FIDELITY}/answer_agreement", agree, settings))
        results[f"{FIDELITY}/agreement_samples"] = float(len(agree))
    return results


def run_statistics(
    benchmark: Benchmark, prefix: str, rows: Sequence[dict[str, Any]], statistics: Statistics
) -> dict[str, float]:
    """Every statistics key of a finished run (intervals, fidelity), from its merged rows."""
    return {
        **interval_metrics(benchmark, prefix, rows, statistics.bootstrap),
        **fidelity_metrics(rows, statistics),
    }
