"""MME (test): two yes/no questions per image in 14 categories; acc + acc+ per category."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, SHORT_ANSWER, Benchmark, Sample, content_id, decode_image


@BENCHMARKS.register("mme")
class MME(Benchmark):
    name = "mme"
    metric = "mme"
    default_columns = {
        "question_id": "question_id",
        "question": "question",
        "answer": "answer",
        "category": "category",
        "image": "image",
    }

    def question_id(self, row: Mapping[str, Any]) -> str:
        # MME's question_id names the image, shared by its two questions: add the question to make it unique.
        image_id = str(self.column(row, "question_id"))
        return f"{image_id}#{content_id(self.column(row, 'question'))}"

    def metric_extras(self, metas: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {"categories": [m["category"] for m in metas], "image_ids": [m["image_id"] for m in metas]}

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        question = str(self.column(row, "question"))
        if self.protocol == "lmms_eval":
            # mme_doc_to_text: strip, then drop " Please answer yes or no." (with its leading space).
            question = question.strip().replace(" Please answer yes or no.", "")
        else:
            # MME questions end with "Please answer yes or no."; LLaVA-1.5 swaps it for the short suffix.
            question = question.replace("Please answer yes or no.", "").strip()
        return Sample(
            question_id=self.question_id(row),
            text=f"{question}\n{SHORT_ANSWER}",
            answers=[str(self.column(row, "answer")).strip()],
            image=decode_image(self.column(row, "image")),
            meta={
                "category": str(self.column(row, "category")),
                "image_id": str(self.column(row, "question_id")),
            },
        )
