"""VQAv2 (validation): ten human answers per question, scored with the official VQA accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, Benchmark, Sample, decode_image


@BENCHMARKS.register("vqav2")
class VQAv2(Benchmark):
    name = "vqav2"
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
        # answers: [{"answer": ..., "answer_confidence": ..., "answer_id": ...}] x 10 (or plain strings)
        answers = [a["answer"] if isinstance(a, Mapping) else str(a) for a in self.column(row, "answers")]
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=answers,
            image=decode_image(self.column(row, "image")),
        )
