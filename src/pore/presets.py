"""Named presets: the config files in conf/, composed by Hydra as the command-line programs compose them.

A preset is conf/strategy/<name>.yaml: a method (conf/method/), a prior (conf/prior/) and its own deltas,
through Hydra's `defaults:` lists. `python src/run.py strategy=<name>` composes it as part of the run's
config; `build_strategy(<name>)` composes the same file with the same loader, so the command line, the
Python API, the benchmark and the sweeps cannot disagree about a preset. No preset is written in Python.

The config folder ships inside the package (`pore/conf`, which is the repository's conf/ in a checkout), and
plug-in folders add theirs (`pore.plugins`). Hydra is imported when a preset is first composed, not with
`import pore`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pore.assets import asset_path
from pore.registry import UnknownNameError
from pore.strategy import Strategy

CONFIG_DIR = Path(__file__).resolve().parent / "conf"  # a link to the repository's conf/ in a checkout
_EXTRA_DIRS: list[Path] = []  # config folders of loaded plug-ins (pore.plugins), searched after ours


def config_dirs() -> list[Path]:
    """The config folders, in search order: the package's own, then those of loaded plug-ins."""
    return [CONFIG_DIR, *_EXTRA_DIRS]


def add_config_dir(path: str | Path) -> None:
    """Search `path` (a folder holding `strategy/`, `method/`, `prior/`, ... groups) for presets too."""
    folder = Path(path).resolve()
    if folder not in _EXTRA_DIRS and folder != CONFIG_DIR:
        _EXTRA_DIRS.append(folder)
        _compose.cache_clear()


def remove_config_dir(path: str | Path) -> None:
    """Stop searching `path` (added by `add_config_dir`)."""
    _EXTRA_DIRS.remove(Path(path).resolve())
    _compose.cache_clear()


def search_path_override() -> list[str]:
    """The Hydra override that adds the plug-in config folders to a program's search path ([] if none)."""
    if not _EXTRA_DIRS:
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{folder}" for folder in _EXTRA_DIRS) + "]"]


def register_resolvers() -> None:
    """The interpolations the config files use besides Hydra's own: `${asset:<path in assets/>}`."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)


def names(group: str = "strategy") -> list[str]:
    """The presets of a config group (`strategy`, `method`, `prior`, `model`, `data`, ...), sorted."""
    found = {path.stem for folder in config_dirs() for path in (folder / group).glob("*.yaml")}
    return sorted(found)


@contextlib.contextmanager
def hydra_on(folders: tuple[Path, ...]) -> Iterator[None]:
    """Hydra initialised on `folders` for the block, leaving any running Hydra app (run.py, bench.py, a
    sweep) exactly as it was: its global state is set aside and put back."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    running = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(folders[0]), version_base="1.3"):
            yield
    finally:
        restore_gh_from_backup(running)


@functools.lru_cache(maxsize=256)
def _compose(group: str, name: str, folders: tuple[Path, ...]) -> dict[str, Any]:
    from hydra import compose
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    register_resolvers()
    extra = [f"hydra.searchpath=[{','.join(f'file://{f}' for f in folders[1:])}]"] if folders[1:] else []
    with hydra_on(folders):
        try:
            config = compose(config_name=None, overrides=[f"+{group}={name}", *extra])
        except MissingConfigException:
            raise UnknownNameError(
                f"unknown {group} {name!r}; choose one of: {', '.join(names(group))}"
            ) from None
    return OmegaConf.to_container(config[group], resolve=True)


def compose_preset(group: str, name: str) -> dict[str, Any]:
    """The composed config of preset `name` of `group`, interpolations resolved, as plain containers."""
    if name not in names(group):
        raise UnknownNameError(f"unknown {group} {name!r}; choose one of: {', '.join(names(group))}")
    return _compose(group, name, tuple(config_dirs()))


def build_strategy(name: str, **overrides: Any) -> Strategy:
    """The preset conf/strategy/<name>.yaml with some settings changed, e.g.
    `build_strategy("pore_linear", keep=64, prior={"alpha": 0.3})`. Call `.resolve(...)` (the `Pruner`
    does) to fit it to a model."""
    return Strategy.from_mapping(compose_preset("strategy", name)).replace(**overrides)
