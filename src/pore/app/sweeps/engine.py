"""The search engine behind the offline runner: Optuna, driven through its ask-and-tell interface.

W&B method -> Optuna sampler: `grid` -> GridSampler (every combination once), `random` -> RandomSampler,
`bayes` -> TPESampler (W&B's server fits a Gaussian process; TPE is Optuna's model-based default and copes
with the categorical and integer settings these sweeps have). W&B distributions map onto Optuna's as in
wandb's own Optuna scheduler (`wandb/sdk/sweeps/scheduler/optuna.py`).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from pore.app.sweeps.spec import Parameter, SweepSpec

# The runner prints its own one line per trial; Optuna's INFO lines would repeat them.
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("optuna").setLevel(logging.WARNING)


def distribution(parameter: Parameter) -> BaseDistribution:
    kind, low, high = parameter.kind, parameter.low, parameter.high
    if kind in ("constant", "categorical"):
        return CategoricalDistribution(list(parameter.values))
    if kind == "int_uniform":
        return IntDistribution(int(low), int(high))
    if kind == "uniform":
        return FloatDistribution(float(low), float(high))
    if kind == "log_uniform_values":
        return FloatDistribution(float(low), float(high), log=True)
    if kind == "q_uniform":
        if all(isinstance(v, int) for v in (low, high, parameter.q)):
            return IntDistribution(int(low), int(high), step=int(parameter.q))
        return FloatDistribution(float(low), float(high), step=float(parameter.q))
    raise ValueError(f"no Optuna distribution for {kind}")


def distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    return {name: distribution(parameter) for name, parameter in spec.parameters.items()}


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its `study.stop()` after the last grid point.

    `stop` only works inside `study.optimize`; in ask-and-tell it raises after the trial is stored. The runner
    decides itself when the grid is done (every combination finished), so the call is left out.
    """

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        return None


def sampler(spec: SweepSpec, seed: int, trial_number: int) -> optuna.samplers.BaseSampler:
    """The sampler that proposes trial `trial_number`.

    Random and bayes samplers are seeded with `seed + trial_number`: proposals are reproducible from the
    state on disk, a resumed runner does not replay the proposals it made before it died (a sampler seeded
    once would start its random sequence again), and parallel runners do not propose the same settings.
    TPE still conditions on every finished trial in the storage. The grid keeps one seed: its shuffled
    order of combinations must be the same in every process.
    """
    if spec.method == "grid":
        return _AskTellGridSampler({n: p.grid_values() for n, p in spec.parameters.items()}, seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed + trial_number)
    return optuna.samplers.TPESampler(seed=seed + trial_number, multivariate=True)


def direction(spec: SweepSpec) -> str:
    # A sweep without a metric (a grid or random sweep may have none) still needs a direction to store.
    return "maximize" if spec.metric is not None and spec.metric.maximize else "minimize"


def propose(spec: SweepSpec, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first `count` parameter sets the engine proposes for this spec, without running anything.

    An in-memory study; every trial is told a placeholder value (its trial number) so that TPE goes past its
    random start-up phase and proposes from its model too. For `--dry-run` and the tests.
    """
    study = optuna.create_study(direction=direction(spec))
    space = distributions(spec)
    proposals = []
    for number in range(count):
        study.sampler = sampler(spec, seed, number)
        trial = study.ask(space)
        proposals.append(dict(trial.params))
        study.tell(trial, float(number))
    return proposals
