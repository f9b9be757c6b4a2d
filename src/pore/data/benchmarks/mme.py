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

    def prompt_default(self, row: Mapping[str, Any]) -> str:
        """MME questions end with "Please answer yes or no."; LLaVA-1.5 swaps it for the short suffix (the
        `default` and `llava` prompt)."""
        question = str(self.column(row, "question")).replace("Please answer yes or no.", "").strip()
        return f"{question}\n{SHORT_ANSWER}"

    def prompt_lmms_eval(self, row: Mapping[str, Any]) -> str:
        """mme_doc_to_text: strip, then drop " Please answer yes or no." (with its leading space)."""
        question = str(self.column(row, "question")).strip().replace(" Please answer yes or no.", "")
        return f"{question}\n{SHORT_ANSWER}"

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=[str(self.column(row, "answer")).strip()],
            image=decode_image(self.column(row, "image")),
            meta={
                "category": str(self.column(row, "category")),
                "image_id": str(self.column(row, "question_id")),
            },
        )
