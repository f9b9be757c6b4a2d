"""The command line checked before Hydra composes it: group choices, setting keys, then the composition.

Hydra reports an unknown group choice (`strategy=fastvv`) as a multi-line list with exit status 1, and a
mistyped key (`strategy.kep=5`) as "Key 'kep' is not in struct" with a suggestion to add it with `+`. Here
each of them is one line with the valid names and the closest ones; `pore.app.cli` prints it with
`error: ` and exits with status 2, before anything is composed, loaded or written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pore import presets
from pore.errors import did_you_mean

PLUGINS_KEY = "plugins"
# Hydra's sweep syntax (`glob(...)`, `range(...)`, `choice(...)`): the sweeper expands it, not checked here.
SWEEP_FUNCTIONS = ("glob(", "range(", "choice(", "interval(", "tag(", "sort(", "shuffle(")


def groups(conf_dir: Path) -> set[str]:
    """The config groups of the program's folder and of the loaded plug-in folders (strategy, model, ...)."""
    folders = [conf_dir, *presets.config_dirs()[1:]]
    return {path.name for folder in folders if folder.is_dir() for path in folder.iterdir() if path.is_dir()}


def _choices(conf_dir: Path, group: str) -> list[str]:
    found = {path.stem for path in (conf_dir / group).glob("*.yaml")}
    return sorted(found | set(presets.names(group)))


def _is_multirun(argv: Sequence[str]) -> bool:
    return any(token in ("-m", "--multirun") for token in argv)


def overrides_of(argv: Sequence[str]) -> list[str]:
    """The `key=value` overrides of a command line (not Hydra's own flags such as --multirun, --cfg job)."""
    return [token for token in argv if not token.startswith("-") and "=" in token]


def selection(token: str, known: set[str]) -> tuple[str, str] | None:
    """(group, value) when `token` selects a group (`strategy=fastv`, `+prior@strategy.prior=linear`)."""
    key, equals, value = token.partition("=")
    if not equals or key.startswith(("~", "hydra")):
        return None
    group = key.lstrip("+").split("@", 1)[0]
    return (group, value) if group in known else None


def unknown_choice_message(argv: Sequence[str], conf_dir: Path) -> str | None:
    """A one-line message for the first group selection whose value is not one of the group's files."""
    known = groups(conf_dir)
    for token in overrides_of(argv):
        picked = selection(token, known)
        if picked is None:
            continue
        group, value = picked
        if value == "null" or any(function in value for function in SWEEP_FUNCTIONS):
            continue  # `null`: no config of the group (Hydra's syntax)
        names = _choices(conf_dir, group)
        # A comma-separated list is a --multirun sweep (without --multirun, Hydra says how to write it).
        for item in [item.strip() for item in value.split(",")]:
            if not item:
                return f"{token} names no {group}; choose one of: {', '.join(names)}"
            if item not in names:
                hint = did_you_mean(item, names)
                return f"unknown {group} {item!r}{hint}; choose one of: {', '.join(names)}"
    return None


def _composed_settings(conf_dir: Path, config_name: str, overrides: list[str]) -> dict[str, Any]:
    """The config `config_name` composed with `overrides`: every setting the user may set, inherited ones
    included; interpolations left unresolved."""
    from hydra import compose

    presets.register_resolvers()
    with presets.hydra_on((conf_dir, *presets.config_dirs()[1:])):
        cfg = compose(config_name, overrides=[*overrides, *presets.search_path_override()])
    return OmegaConf.to_container(cfg, resolve=False)


def unknown_key_message(argv: Sequence[str], conf_dir: Path, config_name: str = "config") -> str | None:
    """A one-line message for the first plain `a.b=value` override whose key the composed config lacks."""
    tokens = overrides_of(argv)
    known = groups(conf_dir)
    keys = [token.split("=", 1)[0] for token in tokens]
    selections = [token for token in tokens if selection(token, known) is not None]
    if any("," in token for token in selections):
        return None  # a sweep over groups (--multirun): Hydra composes and reports each job
    root = _composed_settings(conf_dir, config_name, selections)
    for key in keys:
        if key.startswith(("+", "~", "hydra", PLUGINS_KEY)) or key in known or "/" in key or "@" in key:
            continue
        node: Any = root
        walked: list[str] = []
        for part in key.split("."):
            if not isinstance(node, dict):
                break
            if part not in node:
                where = ".".join(walked)
                names = sorted(str(name) for name in node)
                hint = did_you_mean(part, names, prefix=f"{where}." if where else "")
                full = ".".join([*walked, part])
                listed = f"the settings of {where or 'the run'} are: {', '.join(names)}"
                if not names:
                    listed = f"{where} has no settings"
                return f"unknown setting {full}{hint}; {listed} (to add a new key, write +{key}=...)"
            node, walked = node[part], [*walked, part]
    return None


def composition_message(argv: Sequence[str], conf_dir: Path, config_name: str = "config") -> str | None:
    """Hydra's own complaint about the whole command line (a value it cannot parse, a key it cannot set,
    a setting added with + that exists), on one line; None when it composes (or is a --multirun sweep,
    composed job by job)."""
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if _is_multirun(argv):
        return None
    overrides = [token for token in overrides_of(argv) if not token.startswith("hydra")]
    try:
        _composed_settings(conf_dir, config_name, overrides)
    except OverrideParseException as error:
        return f"cannot read the override {_unreadable(overrides) or ''!r}: {' '.join(str(error).split())}"
    except (HydraException, OmegaConfBaseException) as error:
        text = " ".join(str(error).split())
        text = text.split(" full_key:", 1)[0]  # OmegaConf's details of where, repeated from the message
        return text.replace("To append to your config use", "to add keys to it, write")
    return None


def _unreadable(overrides: Sequence[str]) -> str | None:
    """The first override Hydra's grammar cannot read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for token in overrides:
        try:
            parser.parse_override(token)
        except HydraException:  # its grammar errors (OverrideParseException is one)
            return token
    return None


def command_line_message(argv: Sequence[str], conf_dir: Path, config_name: str = "config") -> str | None:
    """The first mistake of the command line, in one line (None: Hydra will compose it). One composition
    when there is none; a mistyped key (which fails the composition) is then named with its neighbours."""
    choice = unknown_choice_message(argv, conf_dir)
    if choice or _is_multirun(argv):
        return choice or unknown_key_message(argv, conf_dir, config_name)
    problem = composition_message(argv, conf_dir, config_name)
    return None if problem is None else unknown_key_message(argv, conf_dir, config_name) or problem
