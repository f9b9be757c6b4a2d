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

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        choices = [str(c) for c in self.column(row, "choices")]
        letters = string.ascii_uppercase[: len(choices)]
        hint = str(self.column(row, "hint") or "")
        if self.protocol != "lmms_eval":
            hint = hint.strip()  # sqa_doc_to_text keeps the hint as it is
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
        context = f"Context: {hint}\n" if hint else ""
        return Sample(
            question_id=self.question_id(row),
            text=f"{context}{self.column(row, 'question')}\n{options}\n{LETTER_ANSWER}",
            answers=[letters[int(self.column(row, "answer"))]],
            image=decode_image(self.column(row, "image")),
            meta={"options": choices},
        )
