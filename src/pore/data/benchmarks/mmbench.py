"""MMBench (en, dev): multiple choice A-D; rotated copies (index + k * 1e6) are scored circularly."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, LETTER_ANSWER, Benchmark, Sample, decode_image

LETTERS = "ABCD"
CIRCULAR_STRIDE = 1_000_000  # MMBench numbers the k-th rotation of question i as i + k * 1e6


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "None")


@BENCHMARKS.register("mmbench")
class MMBench(Benchmark):
    name = "mmbench"
    metric = "multiple_choice"
    default_columns = {
        "index": "index",
        "question": "question",
        "hint": "hint",
        "A": "A",
        "B": "B",
        "C": "C",
        "D": "D",
        "answer": "answer",
        "image": "image",
    }

    def question_id(self, row: Mapping[str, Any]) -> str:
        return str(self.column(row, "index"))

    def metric_extras(self, metas: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {"options": [m["options"] for m in metas], "groups": [m["group"] for m in metas]}

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        if self.protocol == "llava":
            letters, text = self._llava_prompt(row)
        elif self.protocol == "lmms_eval":
            letters, text = self._lmms_eval_prompt(row)
        else:
            letters = [letter for letter in LETTERS if _present(self.column(row, letter))]
            options = [str(self.column(row, letter)) for letter in letters]
            hint = str(self.column(row, "hint")).strip() if _present(self.column(row, "hint")) else ""
            listed = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options, strict=True))
            text = f"{hint}\n" if hint else ""
            text += f"{self.column(row, 'question')}\n{listed}\n{LETTER_ANSWER}"
        index = int(self.column(row, "index"))
        return Sample(
            question_id=self.question_id(row),
            text=text,
            answers=[str(self.column(row, "answer")).strip()],
            image=decode_image(self.column(row, "image")),
            meta={
                "options": [str(self.column(row, letter)) for letter in letters],
                "group": index % CIRCULAR_STRIDE,
            },
        )

    def _llava_prompt(self, row: Mapping[str, Any]) -> tuple[list[str], str]:
        """model_vqa_mmbench.py: options up to the first missing one; "hint\nquestion\nA. ...", suffix."""
        letters = list(itertools.takewhile(lambda letter: not _llava_none(self.column(row, letter)), LETTERS))
        question = str(self.column(row, "question"))
        hint = self.column(row, "hint")
        if not _llava_none(hint):
            question = f"{hint}\n{question}"
        for letter in letters:
            question += f"\n{letter}. {self.column(row, letter)}"
        return letters, f"{question}\n{LETTER_ANSWER}"

    def _lmms_eval_prompt(self, row: Mapping[str, Any]) -> tuple[list[str], str]:
        """en_utils.mmbench_doc_to_text: "hint question There are several options:\nA. ...", then "\n" and
        the post prompt, which itself starts with a newline (so a blank line precedes the instruction)."""
        letters = [letter for letter in LETTERS if _lmms_eval_present(self.column(row, letter))]
        listed = "".join(f"\n{letter}. {self.column(row, letter)}" for letter in letters)
        options = f"There are several options:{listed}"
        hint = self.column(row, "hint")
        question = self.column(row, "question")
        query = f"{hint} {question} {options}" if _lmms_eval_present(hint) else f"{question} {options}"
        return letters, f"{query}\n\n{LETTER_ANSWER}"


def _llava_none(value: Any) -> bool:
    """model_vqa_mmbench.py `is_none`: None, NaN, or the strings "nan" / "none" in any case."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def _lmms_eval_present(value: Any) -> bool:
    """An option or hint cell lmms-eval prints: not empty, not None / NaN, not the string "nan"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value != "" and value != "nan"
