"""Exact match (GQA): the prediction equals one of the references, case and punctuation ignored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from pore.metrics._common import check_batch
from pore.metrics.answer_rules import llava_gqa_answer, lmms_eval_exact_answer
from pore.metrics.normalize import normalize_exact


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether `normalize_exact(prediction)` equals `normalize_exact` of any reference.

    Deliberately strict: a prediction with extra words ("yes, it is") does not match "yes"; the prompt asks
    for a single word or phrase, and following it is part of what is measured.
    """
    pred = normalize_exact(prediction)
    return any(pred == normalize_exact(answer) for answer in answers)


def llava_gqa_match(prediction: str, answers: Sequence[str]) -> bool:
    """LLaVA-1.5's GQA reading (`llava_gqa_answer`) equals a reference string exactly (GQA's eval.py)."""
    return llava_gqa_answer(prediction) in answers


def lmms_eval_exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """lmms-eval's exact_match (ignore_case, ignore_punctuation): `lmms_eval_exact_answer` on both sides."""
    pred = lmms_eval_exact_answer(prediction)
    return any(pred == lmms_eval_exact_answer(answer) for answer in answers)


# `exact`: exact_match (lenient); `llava_gqa`: GQA's official reading (LLaVA's convert_gqa_for_eval.py, then
# eval.py's string match), for `default` and `llava`; `lmms_eval_exact`: lmms-eval's metric.
EXACT_RULES: dict[str, Callable[[str, Sequence[str]], bool]] = {
    "exact": exact_match,
    "llava_gqa": llava_gqa_match,
    "lmms_eval_exact": lmms_eval_exact_match,
}


class ExactMatch(Metric):
    """Share of predictions that match a reference exactly after `normalize_exact` -> {"acc"}."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, rule: str = "exact", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if rule not in EXACT_RULES:
            raise ValueError(
                f"unknown exact-match answer rule {rule!r}; choose one of: {', '.join(EXACT_RULES)}"
            )
        self.rule = rule
        self.match = EXACT_RULES[rule]
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]], **extra: Any) -> None:
        """Add a batch of raw model outputs and, per sample, the list of accepted answers."""
        check_batch(predictions, answers)
        self.correct += sum(self.match(pred, refs) for pred, refs in zip(predictions, answers, strict=True))
        self.total += len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"acc": self.correct.double() / self.total.clamp(min=1)}
