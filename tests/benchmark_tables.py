"""Tiny local copies of the benchmark tables, written with `datasets` in each benchmark's real column schema.

The schemas follow the lmms-lab parquet files (extra columns included where the benchmark ignores them),
so that the tests read the data exactly as a run reads a downloaded copy: through `open_stream`.
"""

from __future__ import annotations

import os

# Nothing may be fetched from a hub: switched off before `datasets` is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import io
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

datasets.disable_progress_bars()

Value = datasets.Value
Sequence = datasets.Sequence
Image_ = datasets.Image

FEATURES: dict[str, datasets.Features] = {
    "vqav2": datasets.Features(
        {
            "question_type": Value("string"),
            "multiple_choice_answer": Value("string"),
            "answers": [
                {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}
            ],
            "image_id": Value("int64"),
            "answer_type": Value("string"),
            "question_id": Value("int64"),
            "question": Value("string"),
            "image": Image_(),
        }
    ),
    "textvqa": datasets.Features(
        {
            "image_id": Value("string"),
            "question_id": Value("int64"),
            "question": Value("string"),
            "image": Image_(),
            "answers": Sequence(Value("string")),
            "set_name": Value("string"),
        }
    ),
    "gqa_instructions": datasets.Features(
        {
            "id": Value("string"),
            "imageId": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "fullAnswer": Value("string"),
            "isBalanced": Value("bool"),
        }
    ),
    "gqa_images": datasets.Features({"id": Value("string"), "image": Image_()}),
    "pope": datasets.Features(
        {
            "id": Value("string"),
            "question_id": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "image_source": Value("string"),
            "image": Image_(),
            "category": Value("string"),
        }
    ),
    "mme": datasets.Features(
        {
            "question_id": Value("string"),
            "image": Image_(),
            "question": Value("string"),
            "answer": Value("string"),
            "category": Value("string"),
        }
    ),
    "scienceqa_img": datasets.Features(
        {
            "image": Image_(),
            "question": Value("string"),
            "choices": Sequence(Value("string")),
            "answer": Value("int8"),
            "hint": Value("string"),
            "task": Value("string"),
            "subject": Value("string"),
        }
    ),
    "mmbench": datasets.Features(
        {
            "index": Value("int64"),
            "question": Value("string"),
            "hint": Value("string"),
            "A": Value("string"),
            "B": Value("string"),
            "C": Value("string"),
            "D": Value("string"),
            "answer": Value("string"),
            "category": Value("string"),
            "image": Image_(),
            "source": Value("string"),
            "split": Value("string"),
        }
    ),
}


def png_bytes(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A small one-colour PNG of `width` x `height` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_cell(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> dict[str, Any]:
    """What an image cell holds in a parquet file written by `datasets`: the encoded bytes, no path."""
    return {"bytes": png_bytes(width, height, colour), "path": None}


CORRUPT_IMAGE: dict[str, Any] = {"bytes": b"these bytes are not an image", "path": None}


def write_table(
    folder: Path,
    schema: str,
    rows: list[dict[str, Any]],
    split: str = "test",
    shard_sizes: list[int] | None = None,
) -> Path:
    """Write `rows` as `<folder>/<split>-0000i-of-0000n.parquet` (consecutive rows per shard); returns folder.

    `shard_sizes` gives the rows of each shard file (one file with every row when unset).
    """
    sizes = shard_sizes or [len(rows)]
    assert sum(sizes) == len(rows)
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for shard, size in enumerate(sizes):
        part = datasets.Dataset.from_list(rows[start : start + size], features=FEATURES[schema])
        part.to_parquet(str(folder / f"{split}-{shard:05d}-of-{len(sizes):05d}.parquet"))
        start += size
    return folder


def vqav2_row(question_id: int, question: str, answers: list[str], image: dict[str, Any]) -> dict[str, Any]:
    """A VQAv2 row as lmms-lab stores it: ten answer records, plus columns the benchmark does not read."""
    return {
        "question_type": "what color",
        "multiple_choice_answer": answers[0],
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": index + 1}
            for index, answer in enumerate(answers)
        ],
        "image_id": 1000 + question_id,
        "answer_type": "other",
        "question_id": question_id,
        "question": question,
        "image": image,
    }
