"""Measure a VLM's position bias from data and write a prior file for `strategy=pore_calibrated`.

python src/calibrate.py                                          # embedded model and benchmark, offline
python src/calibrate.py calibrate.layers=[1,2,3]                 # several pruning layers in one pass
python src/calibrate.py model=llava15_7b data=gqa strategy.layer=2 data.limit=500
python src/calibrate.py --help                                   # every config group and setting
"""

from __future__ import annotations

from pore.app.calibrate import calibrate
from pore.app.cli import main

if __name__ == "__main__":
    main(calibrate, "calibrate")
