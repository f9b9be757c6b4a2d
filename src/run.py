"""Evaluate a VLM with a visual-token pruning strategy on a benchmark.

python src/run.py                                    # embedded model and benchmark, default strategy
python src/run.py strategy=pore_linear model=llava15_7b data=gqa strategy.keep=64
python src/run.py --help                             # every config group and setting

A mistake in the settings or the data ends with one line `error: ...` and exit status 2, before the weights
load; other failures keep their traceback (status 1).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pore.app.cli import check_override_keys, run_task
from pore.app.config import register_resolvers
from pore.app.evaluate import evaluate

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    check_override_keys(CONFIG_DIR)
    main()
