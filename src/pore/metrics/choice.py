"""Multiple-choice accuracy (ScienceQA-IMG, MMBench), with MMBench's circular evaluation.

The chosen letter is read from the raw output with a few regular expressions (no LLM judge, so the numbers
are reproducible offline); anything unreadable counts as wrong.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from pore.metrics._common import IntegerCatStates, cat_state, check_batch
from pore.metrics.answer_rules import (
    llava_fork_scienceqa_letter,
    llava_scienceqa_letter,
    lmms_eval_scienceqa_letter,
    mmbench_letter,
)
from pore.metrics.normalize import normalize_exact

# The whole answer is one letter, any case, maybe bracketed or followed by "." / ":": "A", "b", "(C)", "D.".
_ONLY_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:]?")
# The answer starts with a letter: bracketed in any case ("(b) dog"), or a capital followed by a delimiter
# ("A. cat", "A) cat", "C: red", "D, since", "B") or by a space unless it is the word "A" / "I" ("B cat").
_LEADING_LETTER = re.compile(r"[(\[]([A-Za-z])[)\]]|([A-Z])(?=[.):,]|$)|([B-HJ-Z])(?=\s)")
# "The answer is B.", "Answer: C", "the correct option is (d)", "answer: b". A lowercase letter counts only
# in brackets or at the very end, so that "the answer is a cat" is not read as "A".
_KEYWORD_LETTER = re.compile(
    r"\b(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*"
    r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![A-Za-z0-9])|([a-z])(?=[.)]?\s*$))"
)
# A capital letter standing alone anywhere ("I think B is right"), but not the words "A" and "I" when a
# lowercase word follows them ("A cat", "I think").
_LOOSE_LETTER = re.compile(r"(?<![A-Za-z0-9'])(?!(?:A|I)\s+[a-z])([A-Z])(?![A-Za-z0-9'])")


def extract_choice(prediction: str, letters: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a free-form answer picks, as an uppercase letter of `letters`, or None.

    Tried in order, the first hit in `letters` wins:
    1. the answer is just a letter ("A", "b", "(C)", "D.");
    2. it starts with one ("A) cat", "B. dog", "(c) red");
    3. it names one after "answer" / "option" / "choice" ("The answer is B.", "Answer: C");
    4. it equals one option's text (`normalize_exact` on both; `options[i]` belongs to `letters[i]`);
    5. exactly one distinct capital letter of `letters` stands alone in it ("I'd say B").
    Option text comes before the loose scan 5 because an answer that repeats an option ("Plan B") is better
    evidence than a stray capital inside it.
    """
    text = prediction.strip()
    valid = letters.upper()

    def first_valid(matches: Sequence[re.Match[str]]) -> str | None:
        for match in matches:
            letter = next(group for group in match.groups() if group).upper()
            if letter in valid:
                return letter
        return None

    only = _ONLY_LETTER.fullmatch(text)
    found = first_valid([only] if only else [])
    if found is None:
        leading = _LEADING_LETTER.match(text)
        found = first_valid([leading] if leading else [])
    if found is None:
        found = first_valid(list(_KEYWORD_LETTER.finditer(text)))
    if found is None and options:
        said = normalize_exact(text)
        for letter, option in zip(valid, options, strict=False):
            if said and said == normalize_exact(option):
                return letter
    if found is None:
        loose = {match.group(1) for match in _LOOSE_LETTER.finditer(text)} & set(valid)
        if len(loose) == 1:
            found = loose.pop()
    return found


CHOICE_RULES = ("lenient", "llava_scienceqa", "llava_scienceqa_5200b75", "lmms_eval_scienceqa", "mmbench")


def read_choice(rule: str, prediction: str, letters: str, options: Sequence[str] | None) -> str | None:
    """The letter `prediction` picks under an answer rule: `lenient` (extract_choice) or an official one
    (pore.metrics.answer_rules)."""
    if rule == "llava_scienceqa":
        return llava_scienceqa_letter(prediction, len(letters))
    if rule == "llava_scienceqa_5200b75":
        return llava_fork_scienceqa_letter(prediction, len(letters))
    if rule == "lmms_eval_scienceqa":
        return lmms_eval_scienceqa_letter(prediction)
    if rule == "mmbench":
        return mmbench_letter(prediction, options or [])
    return extract_choice(prediction, letters, options)


def _correct_letter(answer: str, index: int) -> str:
    letter = answer.strip().upper()
    if len(letter) != 1 or letter not in string.ascii_uppercase:
        raise ValueError(
            f"multiple-choice answers must be one letter 'A'..'Z', got {answer!r} for sample {index}"
        )
    return letter


class MultipleChoiceAccuracy(IntegerCatStates, Metric):
    """Accuracy of the extracted letter -> {"acc"}, plus {"circular_acc"} when groups are given.

    Circular evaluation (MMBench) asks each question several times with the options rotated; `groups[i]` is
    an id shared by the copies of one question, and a group is right only if every copy is. `circular_acc`
    is the share of right groups, over the samples that came with a group. Copies of a group may be spread
    over ranks: the group ids and per-copy results are "cat" states, grouped after the gather.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor
    group: list[torch.Tensor] | torch.Tensor
    group_correct: list[torch.Tensor] | torch.Tensor

    def __init__(self, rule: str = "lenient", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if rule not in CHOICE_RULES:
            raise ValueError(
                f"unknown multiple-choice answer rule {rule!r}; choose one of: {', '.join(CHOICE_RULES)}"
            )
        self.rule = rule
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("group", default=[], dist_reduce_fx="cat")
        self.add_state("group_correct", default=[], dist_reduce_fx="cat")

    def update(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        options: Sequence[Sequence[str]] | None = None,
        groups: Sequence[int] | None = None,
        **extra: Any,
    ) -> None:
        """Add raw model outputs; `answers[i][0]` is the right letter, `options[i]` the texts of A, B, ..."""
        check_batch(predictions, answers, options=options, groups=groups)
        right = []
        for i, (pred, refs) in enumerate(zip(predictions, answers, strict=True)):
            sample_options = options[i] if options is not None else None
            letters = (
                string.ascii_uppercase[: len(sample_options)] if sample_options else string.ascii_uppercase
            )
            right.append(read_choice(self.rule, pred, letters, sample_options) == _correct_letter(refs[0], i))
        self.correct += sum(right)
        self.total += len(right)
        device = self.device
        # Appended (maybe empty) on every call, so that no rank has an empty list at sync time.
        group_ids = list(groups) if groups is not None else []
        self.group.append(torch.tensor(group_ids, dtype=torch.long, device=device))
        self.group_correct.append(
            torch.tensor(right if groups is not None else [], dtype=torch.long, device=device)
        )

    def compute(self) -> dict[str, torch.Tensor]:
        """{"acc"}, or {"circular_acc", "acc"} with groups: circular accuracy first, as MMBench's headline."""
        results = {"acc": self.correct.double() / self.total.clamp(min=1)}
        groups, right = cat_state(self.group), cat_state(self.group_correct)
        if groups.numel() > 0:
            _, group_of_copy = torch.unique(groups, return_inverse=True)
            wrong_per_group = torch.zeros(
                int(group_of_copy.max()) + 1, dtype=torch.long, device=right.device
            ).index_add_(0, group_of_copy, 1 - right)
            results = {"circular_acc": (wrong_per_group == 0).double().mean(), **results}
        return results
