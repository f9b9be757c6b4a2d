"""Does a trial's command pass the checks its run will do? Checked with Hydra's compose API, no run started.

Exactly what `python src/run.py <overrides>` does before its weights load: the command line's pre-check
(group choices, setting keys: `pore.app.precheck`), the same composition (with Hydra's record of the
overrides, so that a typed `strategy.layer` counts as typed), then the run's own `preflight` on the
composed config: the strategy against the model's depth and image tokens (read from its config.json), the
data, the trainer, the output folder. So a sweep that proposes an impossible setting fails in `--dry-run`
(and in the tests), not hours into a GPU sweep.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, open_dict

from pore.errors import UserError, one_line


def config_dir_of(program: Path) -> Path:
    """`conf/` next to the program's folder (src/run.py -> conf/), as src/run.py finds it."""
    return program.resolve().parent.parent / "conf"


def _task_config(composed: DictConfig) -> DictConfig:
    """The config the run's task receives: the composed one without Hydra's own node."""
    task = copy.deepcopy(composed)
    with open_dict(task):
        del task["hydra"]
    return task


def config_checks(task: DictConfig) -> None:
    """What needs neither the model nor the data: interpolations, the strategy's own settings, the
    benchmark (for sweep files of real models, checked where their configs cannot be read)."""
    from omegaconf import OmegaConf

    from pore.app.config import build_benchmark, build_strategy

    OmegaConf.to_container(task, resolve=True)
    build_strategy(task).resolve(data=str(task.data.name))
    build_benchmark(task)


@contextmanager
def composer(config_dir: Path, run_checks: bool = True) -> Iterator[Callable[[list[str]], DictConfig]]:
    """`check(overrides)` -> the composed config, after the run's checks (`run_checks=False`: only those of
    `config_checks`); raises a `UserError` (or Hydra's error) with the message the run would end with."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from pore.app import precheck
    from pore.app.identity import register_resolvers
    from pore.app.preflight import preflight

    register_resolvers()

    def check(overrides: list[str]) -> DictConfig:
        try:
            composed = hydra.compose("config", overrides=list(overrides), return_hydra_config=True)
        except Exception as error:  # the run's command-line check says why, in its words
            message = precheck.command_line_message(overrides, config_dir)
            raise UserError(message or one_line(error)) from error
        record = HydraConfig.instance()
        saved = record.cfg
        record.set_config(composed)  # what the run's task sees: its overrides, as typed
        try:
            task = _task_config(composed)
            if run_checks:
                preflight(task)
            else:
                config_checks(task)
        finally:
            record.cfg = saved
        return task

    with hydra.initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        yield check
