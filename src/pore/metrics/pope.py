"""POPE (object hallucination): yes/no answers scored as a binary classifier with "yes" as positive."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from pore.metrics._common import check_batch
from pore.metrics.answer_rules import llava_pope_answer, lmms_eval_pope_answer

_WORD = re.compile(r"[a-z0-9']+")
_NEGATIONS = frozenset({"no", "not"})


def parse_pope_answer(prediction: str) -> str:
    """Read a free-form answer as "yes" or "no", following the official POPE evaluation script.

    Rule: keep the first sentence (text before the first "."), and answer "no" if it contains the word
    "no" or "not", "yes" otherwise (so an answer that is neither, e.g. "a dog", counts as "yes", as in POPE).
    The official script splits on spaces and is case-sensitive ("No!" or "NO" would read as yes); here words
    are lowercased runs of letters, digits and apostrophes, so trailing punctuation and capitals do not
    matter. "don't" or "cannot" are not the word "not", as in the script.
    """
    first_sentence = prediction.split(".", 1)[0].lower()
    words = set(_WORD.findall(first_sentence))
    return "no" if words & _NEGATIONS else "yes"


def _label(answer: str, index: int) -> bool:
    label = answer.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE answers must be 'yes' or 'no', got {answer!r} for sample {index}")
    return label == "yes"


# `pope`: the POPE script's negation rule read leniently (parse_pope_answer); `llava_pope`: the same rule
# exactly as LLaVA's eval_pope.py (and POPE's evaluate.py) write it, case-sensitive, split on spaces;
# `lmms_eval_pope`: exactly "yes" / "no".
POPE_RULES: dict[str, Callable[[str], str | None]] = {
    "pope": parse_pope_answer,
    "llava_pope": llava_pope_answer,
    "lmms_eval_pope": lmms_eval_pope_answer,
}
# POPE's three probe sets, each reported on its own as eval_pope.py does (rows of the `by_category` state).
POPE_CATEGORIES: tuple[str, ...] = ("adversarial", "popular", "random")
_COUNTS = ("tp", "fp", "tn", "fn", "other")


class POPEMetrics(Metric):
    """Confusion counts with "yes" as positive -> {"acc", "precision", "recall", "f1", "yes_ratio"}.

    `yes_ratio` is the share of predictions read as "yes", as POPE's and LLaVA's scripts report it (lmms-eval
    reports the share of ground-truth "yes" under that name instead). Every ratio with an empty denominator
    is 0. With `categories` (POPE's probe sets), the same five per category too, as "<category>/acc", ...:
    LLaVA's eval_pope.py reports each category separately; the pooled keys stay.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: torch.Tensor
    fp: torch.Tensor
    tn: torch.Tensor
    fn: torch.Tensor
    other: torch.Tensor

    def __init__(self, rule: str = "pope", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if rule not in POPE_RULES:
            raise ValueError(f"unknown POPE answer rule {rule!r}; choose one of: {', '.join(POPE_RULES)}")
        self.rule = rule
        self.read = POPE_RULES[rule]
        # `other`: answers the rule reads as neither yes nor no (lmms_eval_pope only): wrong, and neither a
        # positive nor a negative prediction.
        for name in ("tp", "fp", "tn", "fn", "other"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # (category, count): the five counts of `_COUNTS` per POPE category.
        zeros = torch.zeros(len(POPE_CATEGORIES), len(_COUNTS), dtype=torch.long)
        self.add_state("by_category", default=zeros, dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        categories: Sequence[str] | None = None,
        **extra: Any,
    ) -> None:
        """Add raw model outputs; `answers[i][0]` is the ground truth "yes" / "no" (any case); `categories`
        (optional) the POPE probe set of each sample (others are counted in the pooled keys only)."""
        check_batch(predictions, answers, categories=categories)
        counts = dict.fromkeys(_COUNTS, 0)
        by_category = torch.zeros_like(self.by_category, device="cpu")
        for i, (pred, refs) in enumerate(zip(predictions, answers, strict=True)):
            truth = _label(refs[0], i)
            said = self.read(pred)
            if said is None:
                outcome = "other"
            else:
                said_yes = said == "yes"
                outcome = ("t" if said_yes == truth else "f") + ("p" if said_yes else "n")
            counts[outcome] += 1
            if categories is not None and categories[i] in POPE_CATEGORIES:
                by_category[POPE_CATEGORIES.index(categories[i]), _COUNTS.index(outcome)] += 1
        self.by_category += by_category.to(self.by_category.device)
        # One in-place add per counter and batch (not per sample): cheap when the states live on a GPU.
        self.tp += counts["tp"]
        self.fp += counts["fp"]
        self.tn += counts["tn"]
        self.fn += counts["fn"]
        self.other += counts["other"]

    def compute(self) -> dict[str, torch.Tensor]:
        results = _scores(self.tp, self.fp, self.tn, self.fn, self.other)
        for row, category in enumerate(POPE_CATEGORIES):
            counts = self.by_category[row]
            if int(counts.sum()) > 0:
                scores = _scores(*counts.unbind())
                results.update({f"{category}/{key}": value for key, value in scores.items()})
        return results


def _scores(*counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """acc, precision, recall, f1 and yes_ratio from the counts tp, fp, tn, fn, other."""
    tp, fp, tn, fn, other = (count.double() for count in counts)
    total = tp + fp + tn + fn + other
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "acc": _ratio(tp + tn, total),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, total),
    }


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (e.g. precision with no "yes" predicted)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))
