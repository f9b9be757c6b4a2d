"""Hydra overrides given to the offline runner: narrow a swept parameter, or add a fixed setting to every run.

`python src/sweep.py sweeps/strategy_grid.yaml -- model=tiny_llava strategy.keep=8,16 data.limit=20`
replaces the swept `strategy.keep` by the values 8 and 16 (the search space changes, so the sweep is
another experiment and gets another folder) and appends `model=tiny_llava data.limit=20` to every command.
"""

from __future__ import annotations

import re
from dataclasses import replace

import yaml

from pore.app.sweeps.spec import Parameter, SweepSpec, SweepSpecError, parse_parameter

# key=value, +key=value, ++key=value, ~key[=value]: Hydra's override forms.
OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.\-/@]*)(?:=(?P<value>.*))?$", re.DOTALL)

# Overrides that change how fast a run goes or where it logs, not its answers
# (pore.app.identity.DATA_LOGISTICS for data; the trainer; the logger): left out of a sweep's identity, so a
# sweep resumes on a machine with another number of GPUs, another batch size or another logger.
LOGISTICS = ("data.batch_size", "data.num_workers", "data.max_failed")
LOGISTICS_GROUPS = ("trainer", "logger", "hydra")


def split_override(token: str) -> tuple[str, str, str | None] | None:
    """(prefix, key, value) of a Hydra override token, or None when the token is not one."""
    match = OVERRIDE.match(token)
    if match is None or (match["value"] is None and match["prefix"] != "~"):
        return None
    return match["prefix"] or "", match["key"], match["value"]


def override_key(token: str) -> str | None:
    parts = split_override(token)
    return None if parts is None else parts[1]


def is_logistics(key: str) -> bool:
    return key in LOGISTICS or key.split(".")[0] in LOGISTICS_GROUPS


def _parse_values(text: str) -> list[object]:
    """`8,16,32` -> [8, 16, 32]; `[2,4]` stays one (list-valued) string; each item read as YAML (types)."""
    if text.startswith(("[", "{", "'", '"')):
        return [text]
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise SweepSpecError(f"empty value in {text!r}")
    return [yaml.safe_load(item) if item.lower() not in ("null", "none", "~") else item for item in items]


def apply_overrides(spec: SweepSpec, overrides: list[str]) -> tuple[SweepSpec, list[str]]:
    """Narrow the spec's parameters by the overrides that name one; the others are returned, to be appended.

    `key=a` fixes a swept parameter to a; `key=a,b` makes it a categorical choice of a and b.
    """
    parameters = dict(spec.parameters)
    extra: list[str] = []
    for token in overrides:
        parts = split_override(token)
        if parts is None:
            raise SweepSpecError(f"{token!r} is not a Hydra override (key=value, +key=value, ~key)")
        prefix, key, value = parts
        if key == "output_dir":
            raise SweepSpecError(
                "the runner gives each trial its own output_dir; choose the sweep's folder with --dir"
            )
        if key in parameters and not prefix:
            values = _parse_values(value)
            raw = {"value": values[0]} if len(values) == 1 else {"values": values}
            parameter: Parameter = parse_parameter(key, raw)
            parameters[key] = parameter
        else:
            extra.append(token)
    return replace(spec, parameters=parameters), extra


def dedupe(tokens: list[str]) -> list[str]:
    """Keep the last override of each key (later ones win, as the runner's own and the user's come last).

    Hydra refuses some repeated keys (a config group chosen twice), so repeats are removed, not passed on.
    """
    seen: set[str] = set()
    kept: list[str] = []
    for token in reversed(tokens):
        key = override_key(token)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        kept.append(token)
    return kept[::-1]
