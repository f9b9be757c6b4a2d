"""MME: yes/no questions in 14 categories, two per image, scored per category as acc + acc+ in points."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from pore.metrics._common import IntegerCatStates, cat_state, check_batch
from pore.metrics.answer_rules import lmms_eval_mme_answer, mme_calculation_answer

PERCEPTION_CATEGORIES: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION_CATEGORIES: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
# The position of a category in this tuple is the integer stored in the metric's state.
MME_CATEGORIES: tuple[str, ...] = PERCEPTION_CATEGORIES + COGNITION_CATEGORIES
_CATEGORY_INDEX: dict[str, int] = {name.lower(): i for i, name in enumerate(MME_CATEGORIES)}

_FIRST_WORD = re.compile(r"[a-z0-9]+")


def parse_mme_answer(prediction: str) -> str | None:
    """ "yes" / "no" if the first word of the answer is one (case and punctuation ignored), else None.

    None is simply wrong. (The MME tool looks for "yes" / "no" inside the first four characters, which
    also reads e.g. "not" or "none" as "no"; taking the first whole word avoids such accidents. With the
    single-word prompt the two agree on ordinary answers: "Yes", "No.", "yes, there is".)
    """
    match = _FIRST_WORD.search(prediction.lower())
    word = match.group(0) if match else None
    return word if word in ("yes", "no") else None


def stable_hash(text: str) -> int:
    """A signed 64-bit hash that is the same in every process (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def category_index(name: str) -> int:
    """Index of an MME category in `MME_CATEGORIES` (case-insensitive); ValueError for an unknown one."""
    try:
        return _CATEGORY_INDEX[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown MME category {name!r}; valid categories: {', '.join(MME_CATEGORIES)}"
        ) from None


# `first_word`: parse_mme_answer; `mme_calculation`: MME's own calculation.py (`default`, `llava`);
# `mme_prefix`: lmms-eval's parse_pred_ans (from Otter), which also maps "y" / "n" and drops periods.
MME_RULES = {
    "first_word": parse_mme_answer,
    "mme_calculation": mme_calculation_answer,
    "mme_prefix": lmms_eval_mme_answer,
}


class MMEMetrics(IntegerCatStates, Metric):
    """MME scores in points, as computed by the official MME tool.

    Per category: acc = 100 * right questions / questions, acc+ = 100 * images whose questions are all
    right / images, score = acc + acc+ (at most 200). Keys: "<category>/acc", "<category>/acc_plus",
    "<category>/score" for every category seen, "perception" (sum of the perception scores seen, at most
    2000), "cognition" (at most 800) and "total".

    acc+ needs to know which questions share an image, possibly across ranks, so every question is kept as
    (category index, 64-bit hash of the image id, right or wrong) in "cat" states; images are grouped within
    a category only, since MME reuses some image files across categories.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    category: list[torch.Tensor] | torch.Tensor
    image: list[torch.Tensor] | torch.Tensor
    correct: list[torch.Tensor] | torch.Tensor

    def __init__(self, rule: str = "first_word", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if rule not in MME_RULES:
            raise ValueError(f"unknown MME answer rule {rule!r}; choose one of: {', '.join(MME_RULES)}")
        self.read = MME_RULES[rule]
        self.add_state("category", default=[], dist_reduce_fx="cat")
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        categories: Sequence[str],
        image_ids: Sequence[str],
        **extra: Any,
    ) -> None:
        """Add raw model outputs; `answers[i][0]` is "Yes" / "No", `image_ids` tie an image's questions."""
        check_batch(predictions, answers, categories=categories, image_ids=image_ids)
        correct = []
        for i, (pred, refs) in enumerate(zip(predictions, answers, strict=True)):
            truth = refs[0].strip().lower()
            if truth not in ("yes", "no"):
                raise ValueError(f"MME answers must be 'yes' or 'no', got {refs[0]!r} for sample {i}")
            correct.append(self.read(pred) == truth)
        device = self.device
        # Appended even for an empty batch, so that a rank's lists are never empty at sync time.
        self.category.append(
            torch.tensor([category_index(c) for c in categories], dtype=torch.long, device=device)
        )
        self.image.append(torch.tensor([stable_hash(i) for i in image_ids], dtype=torch.long, device=device))
        self.correct.append(torch.tensor(correct, dtype=torch.long, device=device))

    def compute(self) -> dict[str, torch.Tensor]:
        categories, images, correct = (cat_state(s) for s in (self.category, self.image, self.correct))
        zero = torch.zeros((), dtype=torch.float64, device=correct.device)
        results: dict[str, torch.Tensor] = {}
        perception, cognition = zero.clone(), zero.clone()
        for index, name in enumerate(MME_CATEGORIES):
            in_category = categories == index
            if not bool(in_category.any()):
                continue
            right = correct[in_category]
            acc = right.double().mean() * 100
            _, image_of_question = torch.unique(images[in_category], return_inverse=True)
            wrong_per_image = torch.zeros(
                int(image_of_question.max()) + 1, dtype=torch.long, device=right.device
            ).index_add_(0, image_of_question, 1 - right)
            acc_plus = (wrong_per_image == 0).double().mean() * 100
            score = acc + acc_plus
            results[f"{name}/acc"] = acc
            results[f"{name}/acc_plus"] = acc_plus
            results[f"{name}/score"] = score
            if name in PERCEPTION_CATEGORIES:
                perception = perception + score
            else:
                cognition = cognition + score
        results["perception"] = perception
        results["cognition"] = cognition
        results["total"] = perception + cognition
        return results
