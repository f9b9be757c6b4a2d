"""The sweep's results: completed trials ranked by a key of their `metrics.json`, as a table and a CSV.

The values are read from each trial's own `metrics.json` (what the W&B logger also received), so the
table is right even for trials whose runner died after the run had finished. A rank key without a `/`
(e.g. `acc`) is relative to each run's benchmark (`gqa/acc`, `pope_adversarial/acc`, ...): the table is then
split by benchmark, which is how a grid across benchmarks is read (its runs are not comparable across them).

Each ranked run also shows the bootstrap interval of its value (from its metrics.json) and, when ranking by
a metric to maximise, its paired difference to the first of its benchmark on the same questions, with the
interval and whether the data tell the two apart (`pore.app.comparison.summary`, docs/statistics.md).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from pore.app.evaluation.uncertainty import HIGH, LOW, interval_key
from pore.app.sweeps.spec import SweepSpec, digest
from pore.stats.bootstrap import BootstrapSettings

OUTPUT_DIR = "output_dir"  # user attribute of every trial: its run folder


@dataclass
class Entry:
    number: int
    state: str
    params: dict[str, Any]
    output_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    benchmark: str | None = None
    value: float | None = None  # the rank key's value
    key: str | None = None  # the rank key, resolved for this run's benchmark
    note: str = ""


def read_metrics(output_dir: Path | None, fallback: dict[str, float] | None) -> dict[str, float]:
    if output_dir is not None:
        path = output_dir / "metrics.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return dict(fallback or {})


def benchmark_name(output_dir: Path | None, metrics: dict[str, float]) -> str | None:
    """The run's `data.name` (the prefix of its benchmark keys): from its saved config, else from its keys."""
    if output_dir is not None and (output_dir / "config.yaml").exists():
        try:
            config = yaml.safe_load((output_dir / "config.yaml").read_text())
            return str(config["data"]["name"])
        except (yaml.YAMLError, KeyError, TypeError):
            pass
    prefixes = {key.split("/")[0] for key in metrics if "/" in key and not key.startswith("eff/")}
    return prefixes.pop() if len(prefixes) == 1 else None


def resolve_key(key: str, benchmark: str | None) -> str | None:
    if "/" in key:
        return key
    return None if benchmark is None else f"{benchmark}/{key}"


def collect(trials: list[FrozenTrial], rank_by: str) -> list[Entry]:
    """One entry per trial, the rank key's value filled in for completed trials that report it."""
    entries = []
    for trial in trials:
        attrs = trial.user_attrs
        output_dir = Path(attrs[OUTPUT_DIR]) if OUTPUT_DIR in attrs else None
        entry = Entry(trial.number, trial.state.name, dict(trial.params), output_dir)
        if trial.state == TrialState.COMPLETE:
            entry.metrics = read_metrics(output_dir, attrs.get("metrics"))
            entry.benchmark = benchmark_name(output_dir, entry.metrics)
            entry.key = resolve_key(rank_by, entry.benchmark)
            value = entry.metrics.get(entry.key) if entry.key else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                entry.value = float(value)
        entry.note = str(attrs.get("failure", ""))
        entries.append(entry)
    return entries


def ranked(entries: list[Entry], maximize: bool) -> list[Entry]:
    """Completed entries, each parameter set once (its first trial), best first; without a value last."""
    seen: set[str] = set()
    unique = []
    for entry in sorted(entries, key=lambda e: e.number):
        if entry.state != TrialState.COMPLETE.name:
            continue
        params = digest(entry.params)
        if params in seen:
            continue
        seen.add(params)
        unique.append(entry)
    sign = -1.0 if maximize else 1.0
    return sorted(unique, key=lambda e: (e.value is None, sign * (e.value or 0.0), e.number))


def versus(entries: list[Entry], maximize: bool, rank_by: str) -> dict[int, Any]:
    """{trial number: its comparison with the best trial of its benchmark} (empty when minimising: the rank
    key is then a cost, not a score)."""
    from pore.app.comparison.summary import versus_best

    if not maximize:
        return {}
    best = ranked(entries, maximize)
    results = versus_best([entry.output_dir for entry in best], BootstrapSettings(), metric=rank_by)
    return {best[index].number: result for index, result in results.items()}


def _interval_cell(entry: Entry) -> str:
    low, high = (entry.metrics.get(interval_key(entry.key or "", side)) for side in (LOW, HIGH))
    return "-" if low is None or high is None else f"[{low:.4g}, {high:.4g}]"


def _versus_cell(result: Any, level: float) -> str:
    if result is None:
        return "-"
    columns = result.columns(level)
    if columns["differs_from_best"] == "best":
        return "best"
    mark = "*" if columns["differs_from_best"] == "yes" else "(tied)"
    return f"{columns['vs_best']:+.4g} {columns['vs_best_ci']} {mark}"


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows of cells as text lines, each column padded to its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(
    entries: list[Entry],
    spec: SweepSpec,
    rank_by: str,
    maximize: bool,
    columns: list[str],
    top: int | None,
    compared: dict[int, Any] | None = None,
) -> str:
    """Text tables, one per benchmark when the rank key is relative to the benchmark. `compared`: the
    trials' comparisons with the best (`versus`), computed when not given."""
    best = ranked(entries, maximize)
    compared = versus(entries, maximize, rank_by) if compared is None else compared
    level = BootstrapSettings().level
    groups: dict[str | None, list[Entry]] = {}
    for entry in best:
        groups.setdefault(entry.benchmark if "/" not in rank_by else None, []).append(entry)
    fixed = {name: p.values[0] for name, p in spec.parameters.items() if p.is_fixed}
    swept = spec.swept
    lines = []
    counts = {
        state: sum(e.state == state for e in entries) for state in ("COMPLETE", "FAIL", "RUNNING", "WAITING")
    }
    lines.append(
        f"sweep {spec.name} ({spec.method}): {counts['COMPLETE']} complete, {counts['FAIL']} failed, "
        f"{counts['RUNNING']} running, {counts['WAITING']} waiting; ranked by {rank_by} "
        f"({'maximize' if maximize else 'minimize'})"
    )
    if fixed:
        lines.append("fixed: " + " ".join(f"{name}={value}" for name, value in fixed.items()))
    for group, members in groups.items():
        header_key = rank_by if group is None else f"{group}/{rank_by}"
        header = ["rank", "trial", header_key, *swept, *columns, "interval", "vs best (paired)"]
        rows = [
            [
                str(rank),
                str(entry.number),
                "-" if entry.value is None else _format(entry.value),
                *(_format(entry.params.get(name, "")) for name in swept),
                *(_format(entry.metrics[c]) if c in entry.metrics else "-" for c in columns),
                _interval_cell(entry),
                _versus_cell(compared.get(entry.number), level),
            ]
            for rank, entry in enumerate(members[:top] if top else members, start=1)
        ]
        lines += ["", *_aligned([header, *rows])]
        if top and len(members) > top:
            lines.append(f"... {len(members) - top} more in leaderboard.csv")
    if not best:
        lines.append("(no completed trials yet)")
    for entry in entries:
        if entry.state == TrialState.FAIL.name:
            shown = "".join(f" {name}={entry.params[name]}" for name in swept if name in entry.params)
            lines.append(f"failed: trial {entry.number}{shown}: {entry.note}")
    return "\n".join(lines)


COMPARED = ("vs_best", "vs_best_ci", "differs_from_best", "agrees_with_unpruned")


def write_csv(
    path: Path,
    entries: list[Entry],
    spec: SweepSpec,
    rank_by: str,
    maximize: bool,
    compared: dict[int, Any] | None = None,
) -> None:
    """Every trial with every metric (pivot it with pandas) and its comparison with the best trial of its
    benchmark; completed ones carry their rank."""
    rank_of = {entry.number: rank for rank, entry in enumerate(ranked(entries, maximize), start=1)}
    compared = versus(entries, maximize, rank_by) if compared is None else compared
    level = BootstrapSettings().level
    metric_keys = sorted({key for entry in entries for key in entry.metrics})
    names = list(spec.parameters)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = [
            "rank",
            "trial",
            "state",
            "benchmark",
            rank_by,
            *names,
            *metric_keys,
            *COMPARED,
            "output_dir",
        ]
        writer.writerow(header)
        for entry in sorted(entries, key=lambda e: (rank_of.get(e.number, math.inf), e.number)):
            writer.writerow(
                [
                    rank_of.get(entry.number, ""),
                    entry.number,
                    entry.state,
                    entry.benchmark or "",
                    "" if entry.value is None else entry.value,
                    *(entry.params.get(name, "") for name in names),
                    *(entry.metrics.get(key, "") for key in metric_keys),
                    *_compared_cells(compared.get(entry.number), level),
                    entry.output_dir or "",
                ]
            )


def _compared_cells(result: Any, level: float) -> list[Any]:
    if result is None:
        return [""] * len(COMPARED)
    columns = result.columns(level)
    return [columns[key] for key in COMPARED]


def wandb_offline_runs(entries: list[Entry]) -> list[Path]:
    """The finished offline W&B run of each completed trial (a killed attempt leaves one without metrics)."""
    runs = []
    for entry in ranked(entries, maximize=True):
        if entry.output_dir is None:
            continue
        finished = [
            run
            for run in sorted((entry.output_dir / "wandb").glob("offline-run-*"))
            if (run / "files" / "metrics.json").exists()
        ]
        if finished:
            runs.append(finished[-1])
    return runs


def load_entries(study: optuna.Study, rank_by: str) -> list[Entry]:
    return collect(study.get_trials(deepcopy=False), rank_by)
