"""Evaluate a VLM with a visual-token pruning strategy on a benchmark.

python src/run.py                                    # embedded model and benchmark, default strategy
python src/run.py strategy=pore_linear model=llava15_7b data=gqa strategy.keep=64
python src/run.py --help                             # every config group and setting
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pore.config import register_resolvers
from pore.evaluate import evaluate

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_resolvers()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    sys.exit(main())
