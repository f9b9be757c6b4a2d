"""Measure a VLM's position bias from data and write a prior file for `strategy=pore_calibrated`.

python src/calibrate.py                                          # embedded model and benchmark, offline
python src/calibrate.py calibrate.layers=[1,2,3]                 # several pruning layers in one pass
python src/calibrate.py model=llava15_7b data=gqa strategy.layer=2 data.limit=500
python src/calibrate.py --help                                   # every config group and setting
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pore.app.calibrate import calibrate
from pore.app.config import register_resolvers

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_resolvers()


@hydra.main(config_path=CONFIG_DIR, config_name="calibrate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    calibrate(cfg)


if __name__ == "__main__":
    sys.exit(main())
