"""`seeds=[0,1,2]`: a stochastic strategy over several seeds in one command, reported as mean and spread.

Each seed is a complete run of its own (`strategy.seed=<k>`, in `<output_dir>/seed<k>`: resumable like any
run, and comparable with `src/compare.py`); `<output_dir>/seeds.json` and `seeds.md` hold every seed's values
with their mean, standard deviation and range. A strategy whose method makes no random choice
(`PruningMethod.stochastic` false: every method but `random`) runs once, as without `seeds`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pore.app import config as build
from pore.app.evaluation.uncertainty import SEED_SPREAD, is_annotation
from pore.errors import UserError
from pore.methods import METHODS
from pore.stats.spread import spread

log = logging.getLogger("pore")
Evaluate = Callable[[DictConfig], "dict[str, Any] | None"]


def wants_seeds(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "seeds", default=None) is not None


def check_seeds(value: Any) -> list[int]:
    """The seeds as a list of distinct integers (a `UserError` naming the setting otherwise)."""
    seeds = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    valid = (
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    )
    if not valid or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be a list of distinct integers, e.g. seeds=[0,1,2], got {seeds!r}")
    return list(seeds)


def _with(cfg: DictConfig, **settings: Any) -> DictConfig:
    """A copy of the run config with some top-level / dotted settings replaced."""
    one = copy.deepcopy(cfg)
    for key, value in settings.items():
        OmegaConf.update(one, key.replace("__", "."), value, merge=False)
    return one


def evaluate_over_seeds(cfg: DictConfig, evaluate: Evaluate) -> dict[str, Any] | None:
    """Run `evaluate` once per seed (a stochastic strategy) or once (a deterministic one); returns the mean
    of every value over the seeds, with `<key>/seed_sd|seed_min|seed_max` and `seeds/n` (None off rank 0)."""
    seeds = check_seeds(cfg.seeds)
    single = _with(cfg, seeds=None)
    try:
        method = build.build_strategy(single).method
        stochastic = METHODS.get(method).stochastic
    except (ValueError, KeyError):  # a bad strategy: the run's own checks say it in one line
        return evaluate(single)
    if not stochastic:
        log.info("seeds: method %r makes no random choice, so it runs once (strategy.seed unused)", method)
        return evaluate(single)
    base = Path(str(cfg.output_dir))
    results: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        metrics = evaluate(_with(single, strategy__seed=seed, output_dir=str(base / f"seed{seed}")))
        if metrics is not None:
            results[seed] = metrics
    if not results:
        return None  # another DDP rank: rank 0 writes the summary
    summary = seed_summary(results)
    (base / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = seeds_markdown(summary)
    (base / "seeds.md").write_text(table)
    print(
        f"\n{len(results)} seeds of {cfg.strategy.name}:\n{table}summary: {base / 'seeds.json'}", flush=True
    )
    return summary["metrics"]


def value_keys(metrics: dict[str, Any]) -> list[str]:
    """The keys that are values of their own (not interval bounds, settings or counts)."""
    return [
        key
        for key, value in metrics.items()
        if isinstance(value, (int, float))
        and not is_annotation(key)
        and not key.endswith(("/samples", "/failed"))
    ]


def seed_summary(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{"seeds", "runs": {seed: metrics}, "metrics": mean and spread of every value all seeds report}."""
    first = next(iter(results.values()))
    keys = [key for key in value_keys(first) if all(key in metrics for metrics in results.values())]
    metrics: dict[str, float] = {}
    for key in keys:
        over = spread([float(results[seed][key]) for seed in results])
        metrics[key] = over.mean
        for suffix, value in zip(SEED_SPREAD, (over.sd, over.low, over.high), strict=True):
            metrics[f"{key}/{suffix}"] = value
    metrics["seeds/n"] = float(len(results))
    return {
        "seeds": list(results),
        "runs": {str(seed): results[seed] for seed in results},
        "metrics": metrics,
    }


def seeds_markdown(summary: dict[str, Any]) -> str:
    """Every value (not efficiency) per seed, with mean, standard deviation and range over the seeds."""
    seeds, metrics = summary["seeds"], summary["metrics"]
    header = ["value", *(f"seed {seed}" for seed in seeds), "mean", "sd", "range"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in value_keys(metrics):
        if key.startswith("eff/"):
            continue
        cells = [f"{summary['runs'][str(seed)][key]:.4g}" for seed in seeds]
        low, high = metrics[f"{key}/seed_min"], metrics[f"{key}/seed_max"]
        cells += [f"{metrics[key]:.4g}", f"{metrics[f'{key}/seed_sd']:.2g}", f"[{low:.4g}, {high:.4g}]"]
        lines.append("| " + " | ".join([key, *cells]) + " |")
    return "\n".join(lines) + "\n"
