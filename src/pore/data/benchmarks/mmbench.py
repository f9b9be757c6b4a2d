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
    protocol_steps = ("prompt", "letters")
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
        index = int(self.column(row, "index"))
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=[str(self.column(row, "answer")).strip()],
            image=decode_image(self.column(row, "image")),
            meta={
                # The options the prompt listed, in order: what the metric reads letters against.
                "options": [str(self.column(row, letter)) for letter in self.variant("letters")(row)],
                "group": index % CIRCULAR_STRIDE,
            },
        )

    # ------------------------------------------------------------------ which options the prompt lists

    def letters_default(self, row: Mapping[str, Any]) -> list[str]:
        """Every option that is present (not empty, None or "nan" / "None")."""
        return [letter for letter in LETTERS if _present(self.column(row, letter))]

    def letters_llava(self, row: Mapping[str, Any]) -> list[str]:
        """model_vqa_mmbench.py: the options up to the first missing one."""
        return list(itertools.takewhile(lambda letter: not _llava_none(self.column(row, letter)), LETTERS))

    def letters_lmms_eval(self, row: Mapping[str, Any]) -> list[str]:
        """create_options_prompt: every option lmms-eval prints."""
        return [letter for letter in LETTERS if _lmms_eval_present(self.column(row, letter))]

    # ------------------------------------------------------------------------------------- the prompt

    def prompt_default(self, row: Mapping[str, Any]) -> str:
        """The hint (stripped, when present) on its own line, the question, every present option as
        "A. ..." and the letter instruction, one per line."""
        letters = self.letters_default(row)
        listed = "\n".join(f"{letter}. {self.column(row, letter)}" for letter in letters)
        hint = str(self.column(row, "hint")).strip() if _present(self.column(row, "hint")) else ""
        text = f"{hint}\n" if hint else ""
        return text + f"{self.column(row, 'question')}\n{listed}\n{LETTER_ANSWER}"

    def prompt_llava(self, row: Mapping[str, Any]) -> str:
        """model_vqa_mmbench.py: "hint\nquestion\nA. ..." (the hint unless None / NaN / "nan" / "none"),
        then the letter instruction."""
        question = str(self.column(row, "question"))
        hint = self.column(row, "hint")
        if not _llava_none(hint):
            question = f"{hint}\n{question}"
        for letter in self.letters_llava(row):
            question += f"\n{letter}. {self.column(row, letter)}"
        return f"{question}\n{LETTER_ANSWER}"

    def prompt_lmms_eval(self, row: Mapping[str, Any]) -> str:
        """en_utils.mmbench_doc_to_text: "hint question There are several options:\nA. ...", then "\n" and
        the post prompt, which itself starts with a newline (so a blank line precedes the instruction)."""
        listed = "".join(f"\n{letter}. {self.column(row, letter)}" for letter in self.letters_lmms_eval(row))
        options = f"There are several options:{listed}"
        hint = self.column(row, "hint")
        question = self.column(row, "question")
        query = f"{hint} {question} {options}" if _lmms_eval_present(hint) else f"{question} {options}"
        return f"{query}\n\n{LETTER_ANSWER}"


def _llava_none(value: Any) -> bool:
    """model_vqa_mmbench.py `is_none`: None, NaN, or the strings "nan" / "none" in any case. An empty string
    counts too: LLaVA reads MMBench's TSV with pandas, which turns an empty cell into NaN (so no stray "\n"
    before the question and no empty "C. " option)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.lower() in ("", "nan", "none")


def _lmms_eval_present(value: Any) -> bool:
    """An option or hint cell lmms-eval prints: not empty, not None / NaN, not the string "nan"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value != "" and value != "nan"
