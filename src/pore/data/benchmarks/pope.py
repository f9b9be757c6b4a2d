"""POPE (test): yes/no object-hallucination probes; `subset` picks adversarial, popular or random."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, SHORT_ANSWER, Benchmark, DataError, Sample, decode_image

SUBSETS = ("adversarial", "popular", "random")


@BENCHMARKS.register("pope")
class POPE(Benchmark):
    name = "pope"
    metric = "pope"
    default_columns = {
        "question_id": "question_id",
        "question": "question",
        "answer": "answer",
        "category": "category",
        "image": "image",
    }

    def __init__(
        self, columns: Mapping[str, str] | None = None, subset: str | None = None, **options: Any
    ) -> None:
        super().__init__(columns, **options)
        if subset is not None and subset not in SUBSETS:
            raise DataError(
                f"pope: unknown subset {subset!r}; choose one of: {', '.join(SUBSETS)} (or null for all)"
            )
        self.subset = subset

    def keep_row(self, row: Mapping[str, Any]) -> bool:
        return self.subset is None or self.column(row, "category") == self.subset

    def question_id(self, row: Mapping[str, Any]) -> str:
        return f"{self.column(row, 'category')}/{self.column(row, 'question_id')}"

    def metric_extras(self, metas: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Each sample's probe set, so that the metric also reports each category (as eval_pope.py does)."""
        return {"categories": [m.get("category") for m in metas]}

    def prompt_lmms_eval(self, row: Mapping[str, Any]) -> str:
        """pope_doc_to_text: the question stripped, then the short-answer instruction."""
        return f"{str(self.column(row, 'question')).strip()}\n{SHORT_ANSWER}"

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=[str(self.column(row, "answer")).strip().lower()],
            image=decode_image(self.column(row, "image")),
            meta={"category": self.column(row, "category")},
        )
