"""Run a W&B sweep file offline: Optuna proposes each run, `src/run.py` evaluates it, the state stays on disk.

python src/sweep.py sweeps/prior_bayes.yaml --trials 40            # resumable: rerun the same command
python src/sweep.py sweeps/strategy_grid.yaml -- data.limit=500     # Hydra overrides for every run
python src/sweep.py sweeps/prior_bayes.yaml --leaderboard           # the ranking so far
python src/sweep.py --help

Online, the same file goes to W&B: `wandb sweep sweeps/prior_bayes.yaml`, then `wandb agent <id>`.
"""

from __future__ import annotations

import sys

from pore.app.sweeps.cli import main

if __name__ == "__main__":
    sys.exit(main())
