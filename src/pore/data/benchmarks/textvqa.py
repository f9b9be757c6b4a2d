"""TextVQA (validation): questions about text in images, ten answers, official VQA accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, SHORT_ANSWER, Benchmark, Sample, decode_image


@BENCHMARKS.register("textvqa")
class TextVQA(Benchmark):
    name = "textvqa"
    metric = "vqa_accuracy"
    default_columns = {
        "question_id": "question_id",
        "question": "question",
        "answers": "answers",
        "image": "image",
    }

    def question_id(self, row: Mapping[str, Any]) -> str:
        return str(self.column(row, "question_id"))

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        return Sample(
            question_id=self.question_id(row),
            text=f"{self.column(row, 'question')}\n{SHORT_ANSWER}",
            answers=[str(a) for a in self.column(row, "answers")],
            image=decode_image(self.column(row, "image")),
        )
