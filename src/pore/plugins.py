"""Plug-in folders: a method, prior, model family or benchmark of your own, outside the source tree.

A plug-in folder holds Python files that register what they define when imported (`@METHODS.register`,
`@PRIORS.register`, `@ADAPTERS.register`, `@BENCHMARKS.register`) and, optionally, a `conf/` folder laid out
like the project's (conf/method/<name>.yaml, conf/prior/<name>.yaml, conf/strategy/<name>.yaml,
conf/data/<name>.yaml, ...)::

    my_plugins/
        keep_left.py              # @METHODS.register("keep_left") class KeepLeft(PruningMethod): ...
        conf/method/keep_left.yaml
        conf/strategy/keep_left.yaml

`load(folder)` imports the folder's `*.py` files (sorted, not those of sub-folders nor names starting with
`_`) and adds its `conf/` to the folders presets are composed from. The command-line programs load the
folders of `plugins=<folder>` (or `plugins=[<a>,<b>]`) on their command line and of `$PORE_PLUGINS`
(folders separated by the path separator), before Hydra composes their config (docs/extending.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from pore import presets

ENVIRONMENT_VARIABLE = "PORE_PLUGINS"
_LOADED: dict[Path, list[str]] = {}  # folder -> the modules imported from it


class PluginError(ValueError):
    """A plug-in folder that cannot be loaded (missing, or one of its files fails to import)."""


def load(folder: str | os.PathLike) -> list[str]:
    """Import the plug-ins of `folder` (once per process) and search its conf/ for presets; returns the names
    of the modules imported."""
    path = Path(folder).expanduser().resolve()
    if path in _LOADED:
        return _LOADED[path]
    if not path.is_dir():
        raise PluginError(
            f"plug-in folder {str(folder)!r} does not exist (plugins= / ${ENVIRONMENT_VARIABLE})"
        )
    modules = []
    for source in sorted(path.glob("*.py")):
        if source.name.startswith("_"):
            continue
        name = f"pore_plugin_{hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()}_{source.stem}"
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise PluginError(
                f"plug-in {source} failed to import: {type(error).__name__}: {error}"
            ) from error
        modules.append(name)
    if (path / "conf").is_dir():
        presets.add_config_dir(path / "conf")
    _LOADED[path] = modules
    return modules


def forget(folder: str | os.PathLike) -> None:
    """Let `load(folder)` import the folder again, and stop searching its conf/ (what its modules registered
    stays registered: unregister it from its registry)."""
    path = Path(folder).expanduser().resolve()
    for name in _LOADED.pop(path, []):
        sys.modules.pop(name, None)
    if (path / "conf").resolve() in presets.config_dirs()[1:]:
        presets.remove_config_dir(path / "conf")


def folders_from_environment() -> list[str]:
    """The plug-in folders named in $PORE_PLUGINS."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "")
    return [folder for folder in value.split(os.pathsep) if folder.strip()]
