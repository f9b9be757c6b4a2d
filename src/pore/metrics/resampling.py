"""A benchmark metric on any resample of its questions, computed by the metric's own code.

Each question goes through the metric's own `update` once, alone, and what it adds to each state is kept:
the increment of a "sum" state, the new elements of a "cat" state. The metric on a resample (a multiset of
questions) is the metric's own `compute` on states rebuilt from those parts: sums added up, elements
gathered. No answer is scored twice and no formula is written again here, so an interval is always around
the number the metric reports (and a fix to a scoring rule reaches the intervals by itself).

What moves together in a resample is the metric's *unit* (`DESIGNS`): an MME image (its two questions make
acc+), an MMBench question with its circular copies, otherwise a question; strata (MME's categories, POPE's
subsets) are resampled separately. A unit drawn twice must count twice, so the "cat" state holding the
unit's id (MME's image hash, MMBench's group) is renumbered per drawn copy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from pore.stats.bootstrap import unit_index, unit_strata

Extras = Mapping[str, Sequence[Any]]  # the metric's `update` keyword arguments, one entry per question
Metas = Sequence[Mapping[str, Any]]  # the samples' `meta`
KeysOf = Callable[[Extras, Metas], Sequence[Hashable] | None]


def _none(extras: Extras, metas: Metas) -> None:
    return None


@dataclass(frozen=True)
class Design:
    """How a metric's questions are resampled: `units` (questions with one key move together), `strata`
    (resampled separately) and `unit_state` (the "cat" state holding the unit's id)."""

    units: KeysOf = _none
    strata: KeysOf = _none
    unit_state: str | None = None


def _mme_units(extras: Extras, metas: Metas) -> list[Hashable]:
    return list(zip(extras["categories"], extras["image_ids"], strict=True))  # images are per category


def _mme_strata(extras: Extras, metas: Metas) -> list[Hashable]:
    return list(extras["categories"])


def _circular_groups(extras: Extras, metas: Metas) -> list[Hashable] | None:
    groups = extras.get("groups")
    return None if groups is None else list(groups)


def _pope_subsets(extras: Extras, metas: Metas) -> list[Hashable] | None:
    subsets = [meta.get("category") for meta in metas]
    return None if all(subset is None for subset in subsets) else subsets


# Keyed by the name of the metric in pore.metrics.METRICS; a metric not listed resamples its questions.
DESIGNS: dict[str, Design] = {
    "mme": Design(units=_mme_units, strata=_mme_strata, unit_state="image"),
    "multiple_choice": Design(units=_circular_groups, unit_state="group"),
    "pope": Design(strata=_pope_subsets),
}


def _csr(owner: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items sorted by owner: (order (E,), start (G,), length (G,)) of each owner's items."""
    order = np.argsort(owner, kind="stable")
    length = np.bincount(owner, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    return order, start, length


def _gather(start: np.ndarray, length: np.ndarray, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Item positions of the `picked` groups, concatenated, and the index in `picked` of each item."""
    lengths = length[picked]
    total = int(lengths.sum())
    copy = np.repeat(np.arange(picked.size), lengths)
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return start[picked][copy] + offsets, copy


class MetricParts:
    """One metric over a fixed list of questions, split into per-question parts (see the module's doc).

    `units` / `strata`: one key per question (None: each question its own unit / one stratum); `unit_state`:
    the "cat" state to renumber per drawn unit.
    """

    def __init__(
        self,
        metric: Metric,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        extras: Extras,
        units: Sequence[Hashable] | None = None,
        strata: Sequence[Hashable] | None = None,
        unit_state: str | None = None,
    ) -> None:
        self.metric, self.size = metric, len(predictions)
        if self.size == 0:
            raise ValueError("no answered question to resample")
        self.unit_of, self.n_units = unit_index(units, self.size)
        self.unit_stratum = unit_strata(self.unit_of, self.n_units, strata)
        self.unit_state = unit_state
        sums, cats = self._split(predictions, answers, extras)
        # "sum" states: (U, F) float64 sums of the flattened increments of each unit's questions.
        self.sum_shapes = {name: (value.shape[1:], value.dtype) for name, value in sums.items()}
        flat = [value.reshape(self.size, -1).double().numpy() for value in sums.values()]
        per_question = np.concatenate(flat, axis=1) if flat else np.zeros((self.size, 0))
        self.unit_sums = np.zeros((self.n_units, per_question.shape[1]))
        np.add.at(self.unit_sums, self.unit_of, per_question)
        # "cat" states: each element's value, and the elements of each unit (CSR over units).
        self.cat_values: dict[str, np.ndarray] = {}
        owners = None
        for name, (values, owner) in cats.items():
            self.cat_values[name] = values.numpy()
            owners = owner if owners is None else owners
            if not torch.equal(owner, owners):
                raise ValueError(f"the cat states of {type(metric).__name__} do not grow together")
        self.has_cats = owners is not None and owners.numel() > 0
        if self.has_cats:
            element_unit = self.unit_of[owners.numpy()]
            self.element_order, self.unit_start, self.unit_length = _csr(element_unit, self.n_units)

    def _split(
        self, predictions: Sequence[str], answers: Sequence[Sequence[str]], extras: Extras
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per question: each "sum" state's increment (n, *shape) and each "cat" state's new elements."""
        metric = self.metric
        metric.reset()
        state = metric.metric_state
        sum_names = [name for name, value in state.items() if isinstance(value, torch.Tensor)]
        cat_names = [name for name, value in state.items() if isinstance(value, list)]
        previous = {name: state[name].clone() for name in sum_names}
        increments: dict[str, list[torch.Tensor]] = {name: [] for name in sum_names}
        elements: dict[str, list[torch.Tensor]] = {name: [] for name in cat_names}
        owners: dict[str, list[torch.Tensor]] = {name: [] for name in cat_names}
        for i in range(self.size):
            lengths = {name: len(getattr(metric, name)) for name in cat_names}
            metric.update(
                [predictions[i]], [answers[i]], **{key: [value[i]] for key, value in extras.items()}
            )
            for name in sum_names:
                now = getattr(metric, name).detach().clone()
                increments[name].append(now - previous[name])
                previous[name] = now
            for name in cat_names:
                new = [t.reshape(-1) for t in getattr(metric, name)[lengths[name] :]]
                added = torch.cat(new) if new else torch.zeros(0, dtype=torch.long)
                elements[name].append(added.cpu())
                owners[name].append(torch.full((added.numel(),), i, dtype=torch.long))
        sums = {name: torch.stack(parts).cpu() for name, parts in increments.items()}
        cats = {name: (torch.cat(elements[name]), torch.cat(owners[name])) for name in cat_names}
        return sums, cats

    # ---------------------------------------------------------------------------------------- evaluation

    def _compute(
        self, sums: np.ndarray, elements: np.ndarray | None, labels: np.ndarray | None
    ) -> dict[str, float]:
        """The metric's own compute on rebuilt states: `sums` (F,), the cat elements at `elements` (sorted
        order) with the unit state set to `labels`."""
        offset = 0
        for name, (shape, dtype) in self.sum_shapes.items():
            size = int(np.prod(shape)) if shape else 1
            value = torch.from_numpy(sums[offset : offset + size].copy()).reshape(shape)
            offset += size
            setattr(
                self.metric, name, value.round().to(dtype) if not dtype.is_floating_point else value.to(dtype)
            )
        for name, values in self.cat_values.items():
            if elements is None:
                setattr(self.metric, name, torch.from_numpy(values[:0]))
            elif name == self.unit_state:
                setattr(self.metric, name, torch.from_numpy(labels))
            else:
                # numpy gathers: torch's advanced indexing costs ~100x more on CPU for 1e4 elements
                setattr(self.metric, name, torch.from_numpy(values[self.element_order[elements]]))
        results = type(self.metric).compute(self.metric)  # the class's compute: no caching, no syncing
        return {key: float(value) for key, value in results.items()}

    def _compute_draw(self, draw: np.ndarray, sums: np.ndarray) -> dict[str, float]:
        if not self.has_cats:
            return self._compute(sums, None, None)
        elements, copy = _gather(self.unit_start, self.unit_length, draw)
        return self._compute(sums, elements, copy.astype(np.int64))

    def value(self) -> dict[str, float]:
        """The metric on every question once (equals the metric's result on the whole run)."""
        return self._compute_draw(np.arange(self.n_units), self.unit_sums.sum(axis=0))

    def values_on(self, draws: np.ndarray) -> dict[str, np.ndarray]:
        """(r,) value of every key on each of the `draws` (r, U) (unit indices drawn per resample)."""
        counts = np.zeros((draws.shape[0], self.n_units))
        np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1.0)
        sums = counts @ self.unit_sums  # (r, F)
        return _columns([self._compute_draw(draw, total) for draw, total in zip(draws, sums, strict=True)])

    def unit_values(self) -> dict[str, np.ndarray]:
        """(U,) value of every key on each unit alone (e.g. 0 / 1 per question for an accuracy)."""
        units = range(self.n_units)
        return _columns([self._compute_draw(np.array([unit]), self.unit_sums[unit]) for unit in units])


def _columns(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """{key: (len(rows),) values}; a key some rows lack (MME's categories absent from a unit) is NaN there."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: np.array([row.get(key, np.nan) for row in rows]) for key in keys}


def metric_parts(
    metric: Metric,
    name: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    extras: Extras,
    metas: Metas,
) -> MetricParts:
    """`MetricParts` of `metric` (registered as `name` in METRICS) with that metric's resampling design."""
    design = DESIGNS.get(name, Design())
    return MetricParts(
        metric,
        predictions,
        answers,
        extras,
        units=design.units(extras, metas),
        strata=design.strata(extras, metas),
        unit_state=design.unit_state,
    )
