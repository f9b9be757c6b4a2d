"""A trial's command line, built from the sweep file's `command:` exactly the way a W&B agent builds it.

The macros and their formats follow wandb's agent (`wandb/wandb_agent.py`, `create_sweep_command_args`), so
one file gives the same runs under `wandb agent` and under the offline runner. Two deliberate differences:
`${interpreter}` is the runner's own Python (the agent writes `python`, i.e. whatever is first on PATH), and
the runner appends its own Hydra overrides (the trial's output_dir, the user's extra settings) at the end.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pore.app.sweeps.overrides import dedupe

ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")  # the agent's `${envvar:NAME}` macro


def agent_args(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """The parameter formats the agent offers as `${args}`, `${args_no_hyphens}`, ... (same strings)."""
    flags: list[str] = []
    no_hyphens: list[str] = []
    no_equals: list[str] = []
    no_booleans: list[str] = []
    append_hydra: list[str] = []
    override_hydra: list[str] = []
    for name, value in params.items():
        flag = f"{name}={value}"  # str() of the value, as the agent writes it
        flags.append("--" + flag)
        no_hyphens.append(flag)
        no_equals += [f"--{name}", str(value)]
        append_hydra.append("+" + flag)
        override_hydra.append("++" + flag)
        if isinstance(value, bool):
            if value:
                no_booleans.append("--" + name)
        else:
            no_booleans.append("--" + flag)
    return {
        "args": flags,
        "args_no_equals": no_equals,
        "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans,
        "args_json": [json.dumps(dict(params))],
        "args_append_hydra": append_hydra,
        "args_override_hydra": override_hydra,
    }


def expand_envvars(chunk: str, environ: Mapping[str, str]) -> str:
    # The agent leaves the bare name in place when the variable is not set; so does this.
    return ENVVAR.sub(lambda m: environ.get(m.group(1), m.group(1)), chunk)


def build_command(
    template: tuple[str, ...] | list[str],
    program: str,
    params: Mapping[str, Any],
    extra_overrides: list[str] = (),
    *,
    interpreter: str = sys.executable,
    json_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The argv of one trial: the template's macros filled in, then `extra_overrides`, later keys winning."""
    environ = os.environ if environ is None else environ
    variables = agent_args(params)
    variables["interpreter"] = [interpreter]
    variables["program"] = [program]
    variables["env"] = ["/usr/bin/env"] if platform.system() != "Windows" else []
    if "${args_json_file}" in template:
        if json_file is None:
            raise ValueError("the command uses ${args_json_file}: give json_file")
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(variables["args_json"][0])
        variables["args_json_file"] = [str(json_file)]
    argv: list[str] = []
    for chunk in template:
        chunk = expand_envvars(str(chunk), environ)
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += variables.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    start = argv.index(program) + 1 if program in argv else len(argv)
    return argv[:start] + dedupe([*argv[start:], *extra_overrides])


def hydra_overrides(argv: list[str], program: str) -> list[str]:
    """The Hydra overrides of a built command (everything after the program)."""
    return argv[argv.index(program) + 1 :]
