"""Does a trial's command compose into a valid run config? Checked with Hydra's compose API, no run started.

The same composition `python src/run.py <overrides>` does, then what the run does first: resolve every
interpolation, build and validate the strategy (ranges of alpha, sigma, keep, layer ...) and the benchmark.
So a sweep that proposes an impossible setting fails in `--dry-run` (and in the tests), not hours into a
GPU sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_dir_of(program: Path) -> Path:
    """`conf/` next to the program's folder (src/run.py -> conf/), as src/run.py finds it."""
    return program.resolve().parent.parent / "conf"


@contextmanager
def composer(config_dir: Path) -> Iterator[Callable[[list[str]], DictConfig]]:
    """`check(overrides)` -> the composed, validated config; raises with Hydra's or the strategy's message."""
    import hydra

    from pore.app.config import build_benchmark, build_strategy
    from pore.app.identity import register_resolvers

    register_resolvers()

    def check(overrides: list[str]) -> DictConfig:
        cfg = hydra.compose("config", overrides=list(overrides))
        resolved: Any = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(resolved, dict)
        build_strategy(cfg).resolve(data=str(cfg.data.name))
        build_benchmark(cfg)
        return cfg

    with hydra.initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        yield check
