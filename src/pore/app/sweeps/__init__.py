"""Sweeps over strategies, budgets, priors and benchmarks, from W&B sweep files (`sweeps/*.yaml`).

The same file runs online (`wandb sweep` + `wandb agent`) and offline (`python src/sweep.py`), where Optuna
proposes each run, the run is `src/run.py` in a subprocess, and the state is kept on disk to resume.

- `spec`: the sweep file, parsed and checked
- `overrides`: command-line Hydra overrides that narrow the search or add fixed settings
- `command`: a trial's command line, as a W&B agent builds it
- `engine`: the Optuna samplers behind W&B's grid / random / bayes
- `state`: the sweep's folder (Optuna journal, run folders, logs, locks)
- `runner`: ask, run, tell, resume
- `leaderboard`: the ranking read from the runs' metrics.json
- `validate`: does a proposed parameter set compose into a valid config
"""

from pore.app.sweeps.spec import Metric, Parameter, SweepSpec, SweepSpecError, load_spec, parse_spec

__all__ = ["Metric", "Parameter", "SweepSpec", "SweepSpecError", "load_spec", "parse_spec"]
