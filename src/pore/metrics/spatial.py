"""Exact match on the synthetic spatial benchmark, overall and broken down by image region and question type.

The breakdown is the point of that benchmark: pruning that keeps the bottom of the image fails the
questions about the top. Regions and types are fixed lists, so the counters are plain summed tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from pore.metrics._common import check_batch
from pore.metrics.exact_match import exact_match

REGIONS = ("top", "bottom", "all")
TYPES = ("colour", "shape", "exists", "count")


def _index(values: Sequence[str], known: tuple[str, ...], what: str) -> list[int]:
    try:
        return [known.index(value) for value in values]
    except ValueError:
        unknown = sorted(set(values) - set(known))
        raise ValueError(f"unknown {what} {unknown}; valid {what}s: {', '.join(known)}") from None


class SpatialAccuracy(Metric):
    """{"acc", "acc_top", "acc_bottom", "acc_all" (counting), "acc_<type>"} from region/type per sample."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("correct_region", "total_region"):
            self.add_state(name, default=torch.zeros(len(REGIONS), dtype=torch.long), dist_reduce_fx="sum")
        for name in ("correct_type", "total_type"):
            self.add_state(name, default=torch.zeros(len(TYPES), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        regions: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
        **extra: Any,
    ) -> None:
        check_batch(predictions, answers)
        if regions is None or types is None or not len(regions) == len(types) == len(predictions):
            raise ValueError("SpatialAccuracy.update needs one region and one type per prediction")
        right = torch.tensor(
            [exact_match(p, a) for p, a in zip(predictions, answers, strict=True)], dtype=torch.long
        )
        region_index = torch.tensor(_index(regions, REGIONS, "region"), dtype=torch.long)
        type_index = torch.tensor(_index(types, TYPES, "type"), dtype=torch.long)
        self.correct_region += (
            torch.bincount(region_index, weights=right, minlength=len(REGIONS)).long().to(self.device)
        )
        self.total_region += torch.bincount(region_index, minlength=len(REGIONS)).to(self.device)
        self.correct_type += (
            torch.bincount(type_index, weights=right, minlength=len(TYPES)).long().to(self.device)
        )
        self.total_type += torch.bincount(type_index, minlength=len(TYPES)).to(self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        results = {"acc": self.correct_region.sum().double() / self.total_region.sum().clamp(min=1)}
        for i, region in enumerate(REGIONS):
            results[f"acc_{region}"] = self.correct_region[i].double() / self.total_region[i].clamp(min=1)
        for i, kind in enumerate(TYPES):
            results[f"acc_{kind}"] = self.correct_type[i].double() / self.total_type[i].clamp(min=1)
        return results
