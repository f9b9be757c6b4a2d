"""Finished run folders, read for comparison: their answers, settings and metric, and whether two compare.

Two runs compare when they answered the same questions of the same benchmark under the same protocol (data
settings, `protocol`, `max_new_tokens`); the strategy and the model may differ. Anything else is refused with
one line that says how the runs differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pore.app.evaluation import predictions
from pore.app.evaluation.predictions import STRATEGY_FILE
from pore.app.evaluation.uncertainty import benchmark_parts
from pore.data import Benchmark
from pore.errors import UserError
from pore.metrics.resampling import MetricParts

IDENTITY = "identity.json"
# What makes two runs' numbers comparable: the same benchmark rows and the same way of asking and scoring.
PROTOCOL_KEYS = ("data", "protocol", "max_new_tokens")
# Data settings that do not change the questions asked or how they are scored (`limit` is checked through
# the question ids themselves).
NOT_PROTOCOL = ("limit", "batch_size", "num_workers")


@dataclass
class RunResult:
    """One finished (or partial) run folder."""

    path: Path
    config: DictConfig
    identity: dict[str, Any]
    rows: list[dict[str, Any]]  # answered rows, sorted by question id
    metrics: dict[str, float] = field(default_factory=dict)
    strategy: dict[str, Any] | None = None  # strategy.json: what the engine ran
    _parts: MetricParts | None = field(default=None, repr=False)

    @cached_property
    def label(self) -> str:
        from pore.app.viz.runs import run_label
        from pore.methods import METHODS

        label = run_label(self.config, self.strategy)
        method = str((self.strategy or {}).get("method", self.config.strategy.get("method", "none")))
        if method in METHODS and METHODS.get(method).stochastic:  # seeds of one strategy differ by seed
            label += f", seed {(self.strategy or {}).get('seed', self.config.strategy.get('seed', 0))}"
        return label

    @cached_property
    def benchmark(self) -> Benchmark:
        from pore.app.config import build_benchmark

        return build_benchmark(self.config)[0]

    @property
    def benchmark_name(self) -> str:
        return str(self.config.data.name)

    @property
    def prunes(self) -> bool:
        """Whether the run pruned (its method is not `none`)."""
        method = (self.strategy or {}).get("method") or self.config.strategy.get("method", "none")
        return str(method) != "none"

    @property
    def ids(self) -> list[str]:
        return [row["question_id"] for row in self.rows]

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {row["question_id"]: row for row in self.rows}

    def parts(self) -> MetricParts:
        """The run's metric over its answered rows (in question-id order), split for resampling (once)."""
        if self._parts is None:
            self._parts = benchmark_parts(self.benchmark, self.rows)
        if self._parts is None:
            raise UserError(f"{self.path} has no answered question")
        return self._parts


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").exists() and (path / predictions.MERGED).exists()


def load_result(path: str | Path) -> RunResult:
    """A run folder (`output_dir` of `src/run.py`); a `UserError` when it is not one."""
    path = Path(path)
    if not is_run_folder(path):
        raise UserError(
            f"{path} is not a finished run folder (it needs config.yaml and {predictions.MERGED}): give "
            "the output_dir of a run of src/run.py"
        )
    config = OmegaConf.load(path / "config.yaml")
    identity = _json(path / IDENTITY)
    if identity is None:  # a folder written before identity.json existed
        identity = {key: OmegaConf.to_container(config.get(key), resolve=True) for key in PROTOCOL_KEYS}
    answered = [row for row in predictions.all_rows(path) if row.get("error") is None]
    rows = sorted(answered, key=lambda row: row["question_id"])
    return RunResult(
        path, config, identity, rows, _json(path / "metrics.json") or {}, _json(path / STRATEGY_FILE)
    )


def differences(first: Any, second: Any, prefix: str) -> list[str]:
    """`dotted.key: first vs second` for every leaf that differs."""
    if isinstance(first, dict) and isinstance(second, dict):
        lines = []
        for key in sorted(set(first) | set(second), key=str):
            lines += differences(first.get(key, "<unset>"), second.get(key, "<unset>"), f"{prefix}.{key}")
        return lines
    return [] if first == second else [f"{prefix}: {first!r} vs {second!r}"]


def protocol_of(run: RunResult) -> dict[str, Any]:
    protocol = {key: run.identity.get(key) for key in PROTOCOL_KEYS}
    if isinstance(protocol["data"], dict):
        protocol["data"] = {k: v for k, v in protocol["data"].items() if k not in NOT_PROTOCOL}
    return protocol


def check_comparable(first: RunResult, second: RunResult) -> None:
    """Refuse (a `UserError`) runs of other benchmarks or protocols, or with other answered questions."""
    changed = differences(protocol_of(first), protocol_of(second), "")
    if changed:
        shown = "; ".join(line.lstrip(".") for line in changed[:4]) + ("; ..." if len(changed) > 4 else "")
        raise UserError(
            f"cannot compare {first.path} and {second.path}: their benchmark or protocol differs ({shown}); "
            "compare runs of one benchmark under one protocol"
        )
    a, b = set(first.ids), set(second.ids)
    if a != b:
        only_a, only_b = sorted(a - b), sorted(b - a)
        example = ", ".join(repr(q) for q in (only_a or only_b)[:3])
        raise UserError(
            f"cannot compare {first.path} and {second.path}: they answered different questions ({len(a)} vs "
            f"{len(b)}; {len(only_a)} only in the first, {len(only_b)} only in the second, e.g. {example}); "
            "finish both runs on the same data (same data.limit), or rerun the one with failed rows"
        )


def find_runs(folder: str | Path) -> list[RunResult]:
    """Every run folder under `folder` (a multirun or a sweep folder, or a run), in path order."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give a multirun, sweep or run folder")
    found = sorted({path.parent for path in root.rglob(predictions.MERGED) if is_run_folder(path.parent)})
    if not found:
        raise UserError(f"no run folder (config.yaml + {predictions.MERGED}) under {root}")
    return [load_result(path) for path in found]
