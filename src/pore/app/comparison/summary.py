"""The comparison columns of the multirun and sweep tables: each run against the best run of its benchmark.

Runs are grouped by what can be compared (same benchmark, protocol and questions, `runs.check_comparable`).
In each group the best run by the headline value is the reference: every other run gets its paired
difference to it, with the paired-bootstrap interval (all runs of a group resampled on the same draws, so
the cost is one resampling per run) and McNemar's exact test for accuracy-type values, and whether the data
tell it from the best. A run of the group that did not prune is the unpruned reference: every run gets its
answer agreement with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pore.app.comparison.pareto import resolve_metric
from pore.app.comparison.runs import RunResult, check_comparable, is_run_folder, load_result
from pore.app.evaluation.uncertainty import agreement
from pore.errors import UserError
from pore.metrics.uncertainty import PairedDifference, binary_outcomes
from pore.stats.bootstrap import BootstrapSettings, Interval, iter_draws, percentile_interval
from pore.stats.paired import mcnemar_exact

log = logging.getLogger("pore")


@dataclass
class VersusBest:
    """A run's place against the best run of its group (`difference` None: it is the best)."""

    key: str
    difference: PairedDifference | None
    agreement: float | None  # share of answers equal to the unpruned run's (None: no unpruned run)

    def columns(self, level: float) -> dict[str, object]:
        if self.difference is None:
            vs_best, interval, differs = 0.0, "", "best"
        else:
            diff = self.difference
            vs_best = diff.difference.estimate
            interval = f"[{diff.difference.low:+.4f}, {diff.difference.high:+.4f}]"
            differs = "yes" if diff.distinguishable(level) else "no"
        return {
            "vs_best": vs_best,
            "vs_best_ci": interval,
            "differs_from_best": differs,
            "agrees_with_unpruned": "" if self.agreement is None else self.agreement,
        }


def _groups(runs: dict[int, RunResult]) -> list[list[int]]:
    """Indices of the runs, grouped by comparability (the first run of a group represents it)."""
    groups: list[list[int]] = []
    for index, run in runs.items():
        for group in groups:
            try:
                check_comparable(runs[group[0]], run)
            except UserError:
                continue
            group.append(index)
            break
        else:
            groups.append([index])
    return groups


def _against_best(group: list[RunResult], key: str, settings: BootstrapSettings) -> list[VersusBest]:
    short = [key.removeprefix(f"{run.benchmark_name}/") for run in group]
    values = [run.parts().value()[name] for run, name in zip(group, short, strict=True)]
    best = int(np.argmax(values))
    first = group[0].parts()
    draws = list(iter_draws(first.n_units, settings, first.unit_stratum))
    resampled = [
        np.concatenate([run.parts().values_on(block)[name] for block in draws])
        for run, name in zip(group, short, strict=True)
    ]
    outcomes = [binary_outcomes(run.parts()).get(name) for run, name in zip(group, short, strict=True)]
    unpruned = next((run for run in group if not run.prunes), None)
    results = []
    for index, run in enumerate(group):
        share = None
        if unpruned is not None:
            share = float(np.mean(agreement(run.rows, unpruned.rows)))
        if index == best:
            results.append(VersusBest(key, None, share))
            continue
        low, high = percentile_interval(resampled[index] - resampled[best], settings.level)
        test = None
        if outcomes[index] is not None and outcomes[best] is not None:
            test = mcnemar_exact(outcomes[best], outcomes[index])
        estimate = values[index] - values[best]
        difference = PairedDifference(
            values[best], values[index], Interval(estimate, float(low), float(high)), test
        )
        results.append(VersusBest(key, difference, share))
    return results


def versus_best(
    folders: list[Path | None], settings: BootstrapSettings, metric: str | None = None
) -> dict[int, VersusBest]:
    """{index of the folder: its comparison with the best run of its group}; folders that are not finished
    runs (a failed job, a seeds group) and groups of one run are left out."""
    runs = {}
    for index, folder in enumerate(folders):
        if folder is not None and is_run_folder(Path(folder)):
            runs[index] = load_result(folder)
    results: dict[int, VersusBest] = {}
    if not settings.enabled:
        return results
    for group in _groups(runs):
        if len(group) < 2:
            continue
        members = [runs[index] for index in group]
        try:
            key = resolve_metric(members[0], metric)
            results.update(zip(group, _against_best(members, key, settings), strict=True))
        except (KeyError, UserError, ValueError) as error:  # a metric some runs lack: no column for them
            log.warning("no comparison with the best run for %s: %s", members[0].path, error)
    return results
