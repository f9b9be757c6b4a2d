"""Wall-clock benchmark of visual-token pruning: prefill, generation and memory against the budget.

python src/bench.py                                   # LLaVA-1.5-7B shapes, random weights, on the GPU
python src/bench.py bench.architecture=llava15_small bench.batch_sizes=[1,4] bench.budgets=[576,192,64]
python src/bench.py model=tiny_llava bench.budgets=[64,16]    # the shipped checkpoint, its own weights
python src/bench.py --help                            # every setting (conf/bench.yaml)
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pore.bench.main import register_resolvers, run_from_config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_resolvers()


@hydra.main(config_path=CONFIG_DIR, config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_from_config(cfg)


if __name__ == "__main__":
    sys.exit(main())
