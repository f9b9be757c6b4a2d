"""TextVQA (validation): questions about text in images, ten answers, official VQA accuracy.

Same columns and metric as VQAv2 (its answers are plain strings, which VQAv2's reader accepts). The prompt
follows the protocol: LLaVA-1.5's question file and lmms-eval capitalise the question (`str.capitalize`);
with `ocr` (LLaVA-1.5's `llava_textvqa_val_v051_ocr.jsonl`, lmms-eval's `ocr: true`) the OCR tokens follow
the question as "Reference OCR token: a, b, c".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, SHORT_ANSWER, Sample, decode_image
from pore.data.benchmarks.vqav2 import VQAv2


@BENCHMARKS.register("textvqa")
class TextVQA(VQAv2):
    name = "textvqa"
    default_columns = {**VQAv2.default_columns, "ocr_tokens": "ocr_tokens"}

    def __init__(self, columns: Mapping[str, str] | None = None, ocr: bool = False, **options: Any) -> None:
        super().__init__(columns, **options)
        self.ocr = bool(ocr)
        if not self.ocr:
            self.columns.pop("ocr_tokens")  # only read (and required) with ocr

    def prompt_default(self, row: Mapping[str, Any]) -> str:
        """The question (with the OCR line when `ocr`) and the short-answer instruction."""
        return self._prompt(row, str(self.column(row, "question")))

    def prompt_lmms_eval(self, row: Mapping[str, Any]) -> str:
        """textvqa_doc_to_text: the question through str.capitalize (first letter up, the rest lowered)."""
        return self._prompt(row, str(self.column(row, "question")).capitalize())

    def prompt_llava(self, row: Mapping[str, Any]) -> str:
        """llava_textvqa_val_v051_ocr.jsonl: every question is str.capitalize()d too (its 5,000 rows)."""
        return self.prompt_lmms_eval(row)

    def _prompt(self, row: Mapping[str, Any], question: str) -> str:
        if self.ocr:
            question += f"\nReference OCR token: {', '.join(str(t) for t in self.column(row, 'ocr_tokens'))}"
        return f"{question}\n{SHORT_ANSWER}"

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        answers = [a["answer"] if isinstance(a, Mapping) else str(a) for a in self.column(row, "answers")]
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=answers,
            image=decode_image(self.column(row, "image")),
        )
