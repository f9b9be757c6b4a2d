"""Evaluate a VLM with a visual-token pruning strategy on a benchmark.

python src/run.py                                    # embedded model and benchmark, default strategy
python src/run.py strategy=pore_linear model=llava15_7b data=gqa strategy.keep=64
python src/run.py plugins=my_plugins strategy=mine   # your own method / prior / strategy (docs/extending.md)
python src/run.py --help                             # every config group and setting

A mistake in the settings or the data ends with one line `error: ...` and exit status 2, before the weights
load; other failures keep their traceback (status 1).
"""

from __future__ import annotations

from pore.app.cli import main
from pore.app.evaluate import evaluate

if __name__ == "__main__":
    main(evaluate, "config")
