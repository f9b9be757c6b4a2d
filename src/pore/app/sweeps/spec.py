"""A W&B sweep file, parsed and checked: the same YAML that `wandb sweep` takes, read for the offline runner.

Only what both routes can honour is accepted, so a file that passes here behaves the same under a W&B agent
and under `python src/sweep.py`. Anything else fails with a message that names what is supported, rather
than being silently dropped (a sweep that quietly searches another space wastes days of GPU time).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pore.assets import REPOSITORY

Scalar = str | int | float | bool

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "log_uniform_values", "q_uniform")
# What a parameter may say, per kind of spec (W&B's names).
PARAMETER_FORMS = (
    "`value: X`, `values: [...]` (optionally with `distribution: categorical`), or `distribution: "
    "int_uniform | uniform | log_uniform_values | q_uniform` with `min` and `max` (and `q` for q_uniform)"
)

# Top-level keys of a W&B sweep config. Those read here; those that only describe the sweep to the W&B
# server (accepted, no effect offline); those that W&B has but this runner cannot honour.
READ_KEYS = ("method", "parameters", "metric", "command", "program", "run_cap")
DESCRIPTIVE_KEYS = ("name", "description", "project", "entity", "controller")
IGNORED_WITH_NOTE = ("early_terminate",)
UNSUPPORTED_KEYS = ("job", "image_uri", "scheduler", "apiVersion", "kind", "metrics")
METRIC_KEYS = ("name", "goal", "target", "impute", "impute_while_running")

# The W&B agent's command when a file gives none.
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")


class SweepSpecError(ValueError):
    """The sweep file asks for something this runner (or W&B) cannot do; the message says what to write."""


@dataclass(frozen=True)
class Parameter:
    """One swept setting (a Hydra override key, e.g. `strategy.prior.alpha`) and where its values come from.

    `kind` is `constant`, `categorical` (finite `values`), or a W&B distribution over [`low`, `high`].
    """

    name: str
    kind: str
    values: tuple[Scalar, ...] = ()
    low: float | None = None
    high: float | None = None
    q: float | None = None

    @property
    def is_finite(self) -> bool:
        return self.kind in ("constant", "categorical", "int_uniform", "q_uniform")

    @property
    def is_fixed(self) -> bool:
        """One possible value: shown in the leaderboard's header, not as a column."""
        return len(self.values) == 1 if self.kind in ("constant", "categorical") else False

    def grid_values(self) -> list[Scalar]:
        """Every value a grid search visits, in order (W&B's grid enumerates int and q ranges too)."""
        if self.kind in ("constant", "categorical"):
            return list(self.values)
        if self.kind == "int_uniform":
            return list(range(int(self.low), int(self.high) + 1))
        if self.kind == "q_uniform":
            steps = round((self.high - self.low) / self.q)
            values = [round(self.low + i * self.q, 12) for i in range(steps + 1)]  # no 0.30000000000000004
            return [int(v) for v in values] if _all_int(self.low, self.high, self.q) else values
        raise SweepSpecError(
            f"parameter {self.name!r}: a grid search needs a finite set of values, and {self.kind} over "
            f"[{self.low}, {self.high}] is continuous; use `values: [...]`, int_uniform or q_uniform"
        )


@dataclass(frozen=True)
class Metric:
    """The key of `metrics.json` (= what the W&B logger writes) that ranks the runs, and which way."""

    name: str
    goal: str = "minimize"  # W&B's default when a file names no goal
    target: float | None = None

    @property
    def maximize(self) -> bool:
        return self.goal == "maximize"

    def reached(self, value: float) -> bool:
        """Whether `value` meets the sweep's `target` (W&B stops the sweep there)."""
        if self.target is None:
            return False
        return value >= self.target if self.maximize else value <= self.target


@dataclass(frozen=True)
class SweepSpec:
    method: str
    parameters: dict[str, Parameter]
    metric: Metric | None
    program: str
    command: tuple[str, ...] = DEFAULT_COMMAND
    run_cap: int | None = None
    name: str | None = None
    source: str | None = None  # the YAML file it came from
    notes: tuple[str, ...] = field(default=(), compare=False)  # what was accepted but has no effect here

    def grid(self) -> list[dict[str, Scalar]]:
        """Every combination of a grid search (in parameter order; Optuna visits them shuffled)."""
        combos: list[dict[str, Scalar]] = [{}]
        for parameter in self.parameters.values():
            combos = [
                {**combo, parameter.name: value} for combo in combos for value in parameter.grid_values()
            ]
        return combos

    @property
    def swept(self) -> list[str]:
        """The parameters that take more than one value (the leaderboard's columns)."""
        return [name for name, parameter in self.parameters.items() if not parameter.is_fixed]

    def identity(self) -> dict[str, Any]:
        """What decides the trials' results: two sweeps with the same identity are the same experiment."""
        return {
            "method": self.method,
            "metric": None if self.metric is None else asdict(self.metric),
            "parameters": {name: asdict(parameter) for name, parameter in sorted(self.parameters.items())},
            "program": self.program,
            "command": list(self.command),
        }


def _all_int(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def _check_choice(name: str, value: Any) -> Scalar:
    if value is None:
        # The W&B agent writes `key=None`, which Hydra reads as the string "None", not as null.
        raise SweepSpecError(
            f"parameter {name!r}: a null value becomes the string 'None' on the command line; "
            "write the string 'null' (Hydra reads `key=null` as null)"
        )
    if not _is_scalar(value):
        raise SweepSpecError(
            f"parameter {name!r}: value {value!r} is a {type(value).__name__}; choices must be strings or "
            "numbers. For a Hydra list write it as a string, e.g. '[2, 4]'"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise SweepSpecError(f"parameter {name!r}: value {value!r} is not a finite number")
    return value


def parse_parameter(name: str, spec: Any) -> Parameter:
    """One entry of `parameters:`, in W&B's syntax, including W&B's inference of a missing distribution."""
    _check_parameter_keys(name, spec)
    distribution = spec.get("distribution")
    if "value" in spec:
        if distribution not in (None, "constant") or "values" in spec:
            raise SweepSpecError(f"parameter {name!r}: `value` is a single fixed value; drop the other keys")
        return Parameter(name, "constant", (_check_choice(name, spec["value"]),))
    if "values" in spec:
        if distribution not in (None, "categorical"):
            raise SweepSpecError(
                f"parameter {name!r}: `values` goes with `distribution: categorical` (or none), "
                f"not {distribution!r}"
            )
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SweepSpecError(f"parameter {name!r}: `values` must be a non-empty list, got {values!r}")
        choices = tuple(_check_choice(name, value) for value in values)
        if len(set(map(repr, choices))) != len(choices):
            raise SweepSpecError(f"parameter {name!r}: `values` lists a value twice: {list(choices)}")
        return Parameter(name, "categorical", choices)
    return _parse_range(name, spec, distribution)


def _check_parameter_keys(name: str, spec: Any) -> None:
    """The forms W&B accepts and this runner supports; the others refused with what to write instead."""
    if not isinstance(spec, Mapping):
        raise SweepSpecError(f"parameter {name!r} must be a mapping: {PARAMETER_FORMS}; got {spec!r}")
    if "parameters" in spec:
        raise SweepSpecError(
            f"parameter {name!r} nests `parameters:`; write each setting as a dotted Hydra key instead, "
            f"e.g. `{name}.<key>:` (the agent passes it as `{name}.<key>=value`)"
        )
    if "probabilities" in spec:
        raise SweepSpecError(
            f"parameter {name!r}: `probabilities` (weighted categorical) is not supported offline: the "
            "search engines draw categories uniformly; repeat a value in `values` to weight it"
        )
    known = {"value", "values", "distribution", "min", "max", "q"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SweepSpecError(
            f"parameter {name!r}: unsupported key(s) {unknown}; supported: {PARAMETER_FORMS} "
            f"(distributions: {', '.join(DISTRIBUTIONS)})"
        )


def _parse_range(name: str, spec: Mapping[str, Any], distribution: str | None) -> Parameter:
    """A parameter drawn from [min, max] (uniform, int_uniform, log_uniform_values, q_uniform)."""
    if "min" not in spec or "max" not in spec:
        raise SweepSpecError(f"parameter {name!r} needs {PARAMETER_FORMS}; got {dict(spec)}")
    low, high = spec["min"], spec["max"]
    if distribution is None:  # W&B infers the distribution from the bounds' types
        distribution = "int_uniform" if _all_int(low, high) else "uniform"
    if distribution not in DISTRIBUTIONS[2:]:
        raise SweepSpecError(
            f"parameter {name!r}: distribution {distribution!r} is not supported; with min/max use one of "
            f"{', '.join(DISTRIBUTIONS[2:])}"
        )
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise SweepSpecError(
                f"parameter {name!r}: min and max must be finite numbers, got {low!r}, {high!r}"
            )
    if not low < high:
        raise SweepSpecError(f"parameter {name!r}: min ({low}) must be below max ({high}); or use `value:`")
    if distribution == "int_uniform" and not _all_int(low, high):
        raise SweepSpecError(f"parameter {name!r}: int_uniform needs integer min and max, got {low}, {high}")
    if distribution == "log_uniform_values" and low <= 0:
        raise SweepSpecError(f"parameter {name!r}: log_uniform_values needs min > 0, got {low}")
    q = None
    if distribution == "q_uniform":
        q = spec.get("q", 1)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or q <= 0:
            raise SweepSpecError(f"parameter {name!r}: q must be a positive number, got {q!r}")
        steps = (high - low) / q
        if abs(steps - round(steps)) > 1e-9:
            # W&B rounds draws to multiples of q; Optuna's stepped ranges start at min. Equal only when
            # max - min is a multiple of q.
            raise SweepSpecError(
                f"parameter {name!r}: max - min ({high - low}) must be a multiple of q ({q})"
            )
    elif "q" in spec:
        raise SweepSpecError(f"parameter {name!r}: `q` only goes with distribution q_uniform")
    return Parameter(name, distribution, (), low, high, q)


def parse_metric(raw: Any) -> tuple[Metric, list[str]]:
    notes: list[str] = []
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise SweepSpecError(f"`metric` must be a mapping with a `name` (a key of metrics.json); got {raw!r}")
    unknown = sorted(set(raw) - set(METRIC_KEYS))
    if unknown:
        raise SweepSpecError(f"`metric`: unsupported key(s) {unknown}; supported: {', '.join(METRIC_KEYS)}")
    goal = raw.get("goal")
    if goal is None:
        notes.append(f"metric {raw['name']!r} names no goal: W&B's default, minimize, applies")
        goal = "minimize"
    if goal not in GOALS:
        raise SweepSpecError(f"`metric.goal` must be minimize or maximize, got {goal!r}")
    target = raw.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
        raise SweepSpecError(f"`metric.target` must be a number, got {target!r}")
    for key in ("impute", "impute_while_running"):
        if key in raw:
            notes.append(f"metric.{key} only affects W&B's own bayes search; ignored offline")
    return Metric(raw["name"], goal, None if target is None else float(target)), notes


def parse_spec(raw: Any, source: str | None = None) -> SweepSpec:
    """A sweep config (the YAML's mapping) -> SweepSpec, or SweepSpecError saying what to change."""
    where = f"{source}: " if source else ""
    try:
        return _parse_spec(raw, source)
    except SweepSpecError as error:
        raise SweepSpecError(f"{where}{error}") from None


def _parse_spec(raw: Any, source: str | None) -> SweepSpec:
    if not isinstance(raw, Mapping):
        raise SweepSpecError("a sweep file must be a YAML mapping with `method`, `parameters`, `program`")
    unsupported = sorted(set(raw) & set(UNSUPPORTED_KEYS))
    if unsupported:
        raise SweepSpecError(f"{unsupported}: W&B Launch settings, not supported by this runner")
    known = (*READ_KEYS, *DESCRIPTIVE_KEYS, *IGNORED_WITH_NOTE)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SweepSpecError(f"unknown key(s) {unknown}; a sweep file may contain: {', '.join(known)}")
    notes: list[str] = []
    method = raw.get("method")
    if method not in METHODS:
        raise SweepSpecError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        raise SweepSpecError("`parameters` must map Hydra override keys (e.g. strategy.keep) to their values")
    parsed = {str(name): parse_parameter(str(name), spec) for name, spec in parameters.items()}
    metric = None
    if raw.get("metric") is not None:
        metric, metric_notes = parse_metric(raw["metric"])
        notes += metric_notes
    elif method == "bayes":
        raise SweepSpecError("a bayes search needs `metric: {name: <key of metrics.json>, goal: ...}`")
    if method == "grid":
        for parameter in parsed.values():
            parameter.grid_values()  # raises for a continuous parameter
    program = raw.get("program")
    if not isinstance(program, str) or not program:
        raise SweepSpecError("`program` must name the script the agent runs, e.g. src/run.py")
    command = raw.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not command or not all(_is_scalar(c) for c in command):
        raise SweepSpecError(f"`command` must be a list of strings, got {command!r}")
    command = tuple(str(c) for c in command)
    hydra_args = ("${args_no_hyphens}", "${args_override_hydra}", "${args_append_hydra}")
    if not any(c in command for c in hydra_args):
        raise SweepSpecError(
            "`command` must pass the parameters as Hydra overrides with ${args_no_hyphens} (or "
            "${args_override_hydra} / ${args_append_hydra}); the runner adds each trial's output_dir "
            "the same way"
        )
    if "${program}" not in command:
        raise SweepSpecError("`command` must contain ${program}")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise SweepSpecError(f"`run_cap` must be a positive integer, got {run_cap!r}")
    if raw.get("early_terminate") is not None:
        notes.append("early_terminate is ignored: every trial runs to the end (evaluation has no epochs)")
    name = raw.get("name")
    return SweepSpec(
        method=method,
        parameters=parsed,
        metric=metric,
        program=program,
        command=command,
        run_cap=run_cap,
        name=str(name) if name is not None else None,
        source=source,
        notes=tuple(notes),
    )


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        shipped = sorted(f"sweeps/{file.name}" for file in (REPOSITORY / "sweeps").glob("*.yaml"))
        what = "is a folder" if path.is_dir() else "does not exist"
        raise SweepSpecError(
            f"sweep file {path} {what}; give a W&B sweep file (the shipped ones: {', '.join(shipped)}; run "
            "from the repository root)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepSpecError(f"{path}: not valid YAML: {error}") from None
    spec = parse_spec(raw, str(path))
    return spec if spec.name else replace(spec, name=path.stem)


def digest(payload: Any, size: int = 4) -> str:
    """A short stable hex digest of JSON-able data (sweep folders, trial folders)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()
