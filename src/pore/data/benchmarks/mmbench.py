"""MMBench (en, dev): multiple choice A-D; rotated copies (index + k * 1e6) are scored circularly."""

from __future__ import annotations

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
            meta={"options": options, "group": index % CIRCULAR_STRIDE},
        )
