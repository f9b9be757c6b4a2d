"""What the command-line entries share: the task wrapper (user errors as one line) and a check of the
override keys before Hydra composes (a mistyped key gets the closest valid names).

Hydra refuses `strategy.kep=5` with "Key 'kep' is not in struct" and a hint about `+`. `check_override_keys`
reads the YAML files the overrides select (the config groups in conf/, no composition) and says instead:
`unknown setting strategy.kep (did you mean strategy.keep?)`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pore.errors import USER_ERROR_EXIT, UserError, did_you_mean, user_errors

log = logging.getLogger("pore")


def _default_choices(conf_dir: Path, config_name: str) -> dict[str, str]:
    defaults = OmegaConf.load(conf_dir / f"{config_name}.yaml").get("defaults") or []
    choices = {}
    for entry in defaults:
        if isinstance(entry, DictConfig):
            for group, choice in entry.items():
                choices[str(group)] = str(choice)
    return choices


def _plain_yaml(path: Path) -> Any:
    """A YAML config as plain containers, interpolations unresolved (they need the composed tree)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def unknown_key_message(argv: Sequence[str], conf_dir: Path, config_name: str = "config") -> str | None:
    """A one-line message for the first plain `a.b=value` override whose key the selected configs lack."""
    tokens = [token for token in argv if not token.startswith("-") and "=" in token]
    groups = {path.name for path in conf_dir.iterdir() if path.is_dir()}
    choices = _default_choices(conf_dir, config_name)
    for token in tokens:
        key = token.split("=", 1)[0]
        if key in groups:
            choices[key] = token.split("=", 1)[1].split(",")[0]
    root = _plain_yaml(conf_dir / f"{config_name}.yaml")
    for token in tokens:
        key = token.split("=", 1)[0]
        if key.startswith(("+", "~", "hydra")) or key in groups or "/" in key or "@" in key:
            continue
        parts = key.split(".")
        if parts[0] in groups:
            path = conf_dir / parts[0] / f"{choices.get(parts[0], '')}.yaml"
            if not path.is_file():
                continue  # a sweep expression or an unknown choice: Hydra says it best
            node: Any = _plain_yaml(path)
            walked, rest = parts[:1], parts[1:]
        else:
            node, walked, rest = root, [], parts
        for part in rest:
            if not isinstance(node, dict):
                break
            if part not in node:
                where = ".".join(walked)
                names = sorted(str(name) for name in node if name != "defaults")
                hint = did_you_mean(part, names, prefix=f"{where}." if where else "")
                full = ".".join([*walked, part])
                known = f"the settings of {where or 'the run'} are: {', '.join(names)}"
                if not names:
                    known = f"{where} has no settings"
                return f"unknown setting {full}{hint}; {known} (to add a new key, write +{key}=...)"
            node, walked = node[part], [*walked, part]
    return None


def check_override_keys(
    conf_dir: Path, config_name: str = "config", argv: Sequence[str] | None = None
) -> None:
    """Exit with status 2 and one line when an override names a setting that does not exist."""
    try:
        message = unknown_key_message(sys.argv[1:] if argv is None else argv, conf_dir, config_name)
    except Exception:  # a config this check cannot read: Hydra composes and reports as usual
        return
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT)


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a Hydra task: a `UserError` is one line on stderr and exit status 2 (in a --multirun, the job's
    row in the summary table says it, and the sweep exits 2 after the table)."""
    if not is_multirun():
        with user_errors():
            return task(cfg)
    try:
        return task(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return {"error": str(error)}
