"""What the Hydra programs (src/run.py, src/calibrate.py, src/bench.py) share, from command line to task.

`main(task, config_name)` is a whole program: it loads the plug-in folders (`plugins=...`, $PORE_PLUGINS) so
that their presets compose, checks the override keys before Hydra composes (a mistyped key gets the closest
valid names: Hydra would say "Key 'kep' is not in struct" and suggest `+`), then runs the task under
`@hydra.main` with user errors as one line and exit status 2. Unknown group choices (`strategy=fastvv`)
get the valid names the same way (`pore.app.precheck`). Tests call it in process with an argv.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pore import plugins, presets
from pore.app import identity, precheck
from pore.errors import USER_ERROR_EXIT, UserError, user_errors

log = logging.getLogger("pore")


CONFIG_DIR = presets.CONFIG_DIR
PLUGINS_KEY = precheck.PLUGINS_KEY


def main(
    task: Callable[[DictConfig], Any], config_name: str, argv: Sequence[str] | None = None, program: str = ""
) -> None:
    """Run `task` on conf/<config_name>.yaml composed with the command line `argv` (default: sys.argv)."""
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    identity.register_resolvers()
    with user_errors():
        argv = load_plugins(argv)
    check_override_keys(CONFIG_DIR, config_name, argv)

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def hydra_main(cfg: DictConfig) -> Any:
        return run_task(task, cfg)

    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    # A caller's own Hydra (a test's compose fixture, a sweep) is set aside for the program's and put back.
    saved, sys.argv = sys.argv, [program or sys.argv[0], *argv]
    running = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        hydra_main()
    finally:
        sys.argv = saved
        restore_gh_from_backup(running)


def load_plugins(argv: list[str]) -> list[str]:
    """Load the plug-in folders of `plugins=<folder>` / `plugins=[<a>,<b>]` and $PORE_PLUGINS; returns the
    command line with their conf/ folders added to Hydra's search path."""
    folders = plugins.folders_from_environment()
    for token in argv:
        key, _, value = token.partition("=")
        if key.lstrip("+") == PLUGINS_KEY and value:
            folders += [item.strip() for item in value.strip("[]").split(",") if item.strip()]
    try:
        for folder in folders:
            plugins.load(folder)
    except plugins.PluginError as error:
        raise UserError(str(error)) from None
    added = [f"file://{folder}" for folder in presets.config_dirs()[1:]]
    if not added:
        return argv
    given = [token for token in argv if token.startswith("hydra.searchpath=")]
    entries = [entry for token in given for entry in token.split("=", 1)[1].strip("[]").split(",") if entry]
    kept = [token for token in argv if token not in given]
    return [*kept, f"hydra.searchpath=[{','.join([*entries, *added])}]"]


def check_override_keys(
    conf_dir: Path, config_name: str = "config", argv: Sequence[str] | None = None
) -> None:
    """Exit with status 2 and one line when the command line names a group choice or a setting that does
    not exist, or does not compose (`pore.app.precheck`)."""
    try:
        message = precheck.command_line_message(sys.argv[1:] if argv is None else argv, conf_dir, config_name)
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
