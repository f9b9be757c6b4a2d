"""ScienceQA-IMG (test): multiple choice with an optional context hint; the answer is a letter."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, LETTER_ANSWER, Benchmark, Sample, content_id, decode_image


@BENCHMARKS.register("scienceqa_img")
class ScienceQAImg(Benchmark):
    name = "scienceqa_img"
    metric = "multiple_choice"
    default_columns = {
        "question": "question",
        "choices": "choices",
        "answer": "answer",
        "hint": "hint",
        "image": "image",
    }

    def question_id(self, row: Mapping[str, Any]) -> str:
        # No id column: the content (question, choices, hint) plus the image bytes' digest identify a row.
        image = self.column(row, "image")
        image_bytes = image.get("bytes") if isinstance(image, Mapping) else None
        return content_id(
            self.column(row, "question"),
            list(self.column(row, "choices")),
            self.column(row, "hint"),
            image_bytes,
        )

    def metric_extras(self, metas: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {"options": [m["options"] for m in metas]}

    def prompt_default(self, row: Mapping[str, Any]) -> str:
        """A "Context: {hint}" line (the hint stripped; none when empty), the question, the lettered choices
        and the letter instruction."""
        return self._prompt(row, str(self.column(row, "hint") or "").strip())

    def prompt_llava(self, row: Mapping[str, Any]) -> str:
        """LLaVA's question file (scripts/convert_sqa_to_llava_base_prompt.py): the default prompt's body with
        `.replace("  ", " ").strip()` applied once, so a raw hint's double spaces become single ones."""
        body = self._prompt(row, str(self.column(row, "hint") or "").strip(), instruction=False)
        return f"{body.replace('  ', ' ').strip()}\n{LETTER_ANSWER}"

    def prompt_lmms_eval(self, row: Mapping[str, Any]) -> str:
        """sqa_doc_to_text: as the default, but the hint as it is stored (its own whitespace kept)."""
        return self._prompt(row, str(self.column(row, "hint") or ""))

    def _prompt(self, row: Mapping[str, Any], hint: str, instruction: bool = True) -> str:
        choices = [str(c) for c in self.column(row, "choices")]
        letters = string.ascii_uppercase[: len(choices)]
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
        context = f"Context: {hint}\n" if hint else ""
        body = f"{context}{self.column(row, 'question')}\n{options}"
        return f"{body}\n{LETTER_ANSWER}" if instruction else body

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        choices = [str(c) for c in self.column(row, "choices")]
        letters = string.ascii_uppercase[: len(choices)]
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=[letters[int(self.column(row, "answer"))]],
            image=decode_image(self.column(row, "image")),
            meta={"options": choices},
        )
