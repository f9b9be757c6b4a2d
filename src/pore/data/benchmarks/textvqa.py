"""TextVQA (validation): questions about text in images, ten answers, official VQA accuracy.

Same columns, prompt and metric as VQAv2 (its answers are plain strings, which VQAv2's reader accepts).
"""

from __future__ import annotations

from pore.data.benchmark import BENCHMARKS
from pore.data.benchmarks.vqav2 import VQAv2


@BENCHMARKS.register("textvqa")
class TextVQA(VQAv2):
    name = "textvqa"
