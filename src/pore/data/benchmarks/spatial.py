"""The synthetic spatial benchmark shipped with the project (made by pore.testing.spatial): scored by region
and question type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, Benchmark, Sample, decode_image


@BENCHMARKS.register("spatial")
class SpatialVQA(Benchmark):
    name = "spatial"
    metric = "spatial"
    default_columns = {
        "question_id": "question_id",
        "question": "question",
        "answer": "answer",
        "type": "type",
        "region": "region",
        "image": "image",
    }

    def question_id(self, row: Mapping[str, Any]) -> str:
        return str(self.column(row, "question_id"))

    def metric_extras(self, metas: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {"regions": [m["region"] for m in metas], "types": [m["type"] for m in metas]}

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=[str(self.column(row, "answer"))],
            image=decode_image(self.column(row, "image")),
            meta={"type": str(self.column(row, "type")), "region": str(self.column(row, "region"))},
        )
