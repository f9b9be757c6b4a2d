"""Benchmark metrics as torchmetrics `Metric`s, correct under DDP.

Every metric takes raw model outputs and per-sample reference answers::

    metric = METRICS["vqa_accuracy"]()
    metric.update(["Two"], [["2", "2", "two", ...]])
    metric.compute()  # {"acc": tensor(...)}

All states are tensors registered with `add_state` ("sum" counters, "cat" per-sample ids and flags), so
`compute()` on any rank of a process group gives the result over every rank's samples. Results are
fractions in [0, 1], except MME, which is in points like the official tool.
"""

from __future__ import annotations

from torchmetrics import Metric

from pore.metrics.choice import MultipleChoiceAccuracy, extract_choice
from pore.metrics.exact_match import ExactMatch, exact_match
from pore.metrics.mme import (
    COGNITION_CATEGORIES,
    MME_CATEGORIES,
    PERCEPTION_CATEGORIES,
    MMEMetrics,
    parse_mme_answer,
    stable_hash,
)
from pore.metrics.normalize import normalize_exact, normalize_vqa
from pore.metrics.pope import POPEMetrics, parse_pope_answer
from pore.metrics.spatial import SpatialAccuracy
from pore.metrics.vqa import VQAAccuracy, vqa_score

METRICS: dict[str, type[Metric]] = {
    "vqa_accuracy": VQAAccuracy,
    "exact_match": ExactMatch,
    "pope": POPEMetrics,
    "mme": MMEMetrics,
    "multiple_choice": MultipleChoiceAccuracy,
    "spatial": SpatialAccuracy,
}

__all__ = [
    "COGNITION_CATEGORIES",
    "METRICS",
    "MME_CATEGORIES",
    "PERCEPTION_CATEGORIES",
    "ExactMatch",
    "MMEMetrics",
    "MultipleChoiceAccuracy",
    "POPEMetrics",
    "SpatialAccuracy",
    "VQAAccuracy",
    "exact_match",
    "extract_choice",
    "normalize_exact",
    "normalize_vqa",
    "parse_mme_answer",
    "parse_pope_answer",
    "stable_hash",
    "vqa_score",
]
