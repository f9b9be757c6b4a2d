"""VQA accuracy (VQAv2, TextVQA): soft agreement with the human answers, as in the official toolkit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from pore.metrics._common import check_batch
from pore.metrics.answer_rules import evalai_normalize, llava_vqav2_answer
from pore.metrics.normalize import normalize_vqa

# An answer given by this many annotators counts as fully right.
HUMAN_AGREEMENT = 3


def vqa_score(
    prediction: str,
    answers: Sequence[str],
    normalize: Callable[[str], str] = normalize_vqa,
    normalize_answer: Callable[[str], str] | None = None,
) -> float:
    """Accuracy of one prediction against its n reference answers, normalised with `normalize` (the
    references with `normalize_answer` when given).

    Mean over the n leave-one-out subsets of the answers of min(1, matches in the subset / 3): with the
    usual 10 answers, a prediction given by 1, 2, 3, 4+ annotators scores 0.3, 0.6, 0.9, 1.0 (a matching
    annotator is left out of some subsets, hence 0.9 and not 1.0 for three). With a single answer there is no
    non-empty subset, so the score is exact match of the normalised strings.

    Both sides are always normalised, as the VQAv2 server (EvalAI) and lmms-eval do for predictions. The
    offline `vqaEval.py` normalises nothing when the references all agree (there, "1,000" would miss ten
    "1000"); its references are stored normalised already, so normalising them too changes nothing on its
    data and keeps other data (TextVQA, raw strings) fair.
    """
    pred = normalize(prediction)
    refs = [(normalize_answer or normalize)(answer) for answer in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(ref == pred for ref in refs)
    # Leaving out a matching answer leaves matches - 1 in the subset, leaving out another one leaves matches.
    total = sum(min(1.0, (matches - (ref == pred)) / HUMAN_AGREEMENT) for ref in refs)
    return total / len(refs)


# Rule -> (normalisation of the prediction, of the references). `vqa`: the VQA toolkit on both (the VQAv2
# server, and lmms-eval 0.7's VQAv2, which no longer word-tokenizes); `evalai`: the EvalAI processor (its
# word_tokenize step first) on both, as LLaVA's TextVQA evaluator and lmms-eval's TextVQA do; `llava_vqav2`:
# LLaVA's submission converter runs the EvalAI processor on the prediction, then the server the toolkit.
VQA_RULES: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "vqa": (normalize_vqa, normalize_vqa),
    "evalai": (evalai_normalize, evalai_normalize),
    "llava_vqav2": (llava_vqav2_answer, normalize_vqa),
}


class VQAAccuracy(Metric):
    """Mean `vqa_score` over samples -> {"acc"} in [0, 1].

    States are two sums (score and count), so the DDP reduction is exact.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score: torch.Tensor
    total: torch.Tensor

    def __init__(self, rule: str = "vqa", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if rule not in VQA_RULES:
            raise ValueError(f"unknown VQA answer rule {rule!r}; choose one of: {', '.join(VQA_RULES)}")
        self.normalize, self.normalize_answer = VQA_RULES[rule]
        # float64: a sum of many scores in float32 would drift in the 7th digit on large splits.
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]], **extra: Any) -> None:
        """Add a batch of raw model outputs and, per sample, the list of reference answers."""
        check_batch(predictions, answers)
        pairs = zip(predictions, answers, strict=True)
        scores = [vqa_score(pred, refs, self.normalize, self.normalize_answer) for pred, refs in pairs]
        self.score += torch.tensor(scores, dtype=torch.float64, device=self.score.device).sum()
        self.total += len(scores)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"acc": self.score / self.total.clamp(min=1)}
