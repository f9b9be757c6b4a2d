"""BenchmarkStream deals every row to exactly one (rank, dataloader worker); PromptCollator builds the batch.

The table has 37 rows in 4 parquet shards of uneven sizes (4, 13, 9, 11), so that both ways of splitting
are exercised: whole shards when the shards divide among the parts (1, 2 or 4 parts), every n-th row
otherwise (3 or 6 parts), and `limit` rows that span two shards.
"""

from __future__ import annotations

import os

# Nothing may be fetched from a hub: switched off before `datasets` is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import LlavaProcessor

from benchmark_tables import CORRUPT_IMAGE, image_cell, vqav2_row, write_table
from pore.data import (
    BENCHMARKS,
    BenchmarkStream,
    FailedSample,
    PromptBatch,
    PromptCollator,
    Sample,
    StreamSource,
)
from pore.testing.tiny_llava import build_processor

ROWS = 37
SHARD_SIZES = [4, 13, 9, 11]
IDS = [str(1000 + i) for i in range(ROWS)]  # question ids, in the stream's order (shard files in name order)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VQAv2-schema table of 37 rows as test-0000i-of-00004.parquet."""
    rows = [
        vqav2_row(1000 + i, f"what color is shape {i}?", ["red"] * 10, image_cell(2 + i % 3, 2))
        for i in range(ROWS)
    ]
    return write_table(tmp_path_factory.mktemp("vqa4"), "vqav2", rows, shard_sizes=SHARD_SIZES)


def ids_per_rank(
    folder: Path,
    world_size: int,
    workers: int,
    limit: int | None = None,
    skip_ids: frozenset[str] = frozenset(),
) -> list[list[str]]:
    """The question ids each rank's DataLoader yields (ranks run one after the other in this process)."""
    bench = BENCHMARKS.get("vqav2")()
    per_rank = []
    for rank in range(world_size):
        stream = BenchmarkStream(
            bench, StreamSource(str(folder), None, "test", limit), skip_ids, rank=rank, world_size=world_size
        )
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        items = list(loader)
        assert all(isinstance(item, Sample) for item in items)
        per_rank.append([item.question_id for item in items])
    return per_rank


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_once_across_ranks_and_workers(sharded: Path, world_size: int, workers: int) -> None:
    """The ranks' outputs together hold each of the 37 question ids exactly once."""
    per_rank = ids_per_rank(sharded, world_size, workers)
    everything = [qid for ids in per_rank for qid in ids]
    assert sorted(everything) == IDS
    if world_size > 1:
        assert all(per_rank), "every rank gets rows"


def test_workers_give_the_same_samples_as_one_process(sharded: Path) -> None:
    """Rows read inside dataloader workers decode like rows read in the main process (answers, images)."""

    def described(workers: int) -> list[tuple]:
        stream = BenchmarkStream(BENCHMARKS.get("vqav2")(), StreamSource(str(sharded), None, "test"))
        items = DataLoader(stream, batch_size=None, num_workers=workers)
        return sorted((s.question_id, s.text, s.answers, s.image.size) for s in items)

    in_process = described(0)
    assert in_process[5] == ("1005", "what color is shape 5?" + SUFFIX, ["red"] * 10, (4, 2))
    assert described(2) == in_process


def test_one_process_reads_the_rows_in_file_order(sharded: Path) -> None:
    """Without ranks or workers the stream is the table itself, in shard-file order."""
    assert ids_per_rank(sharded, 1, 0) == [IDS]


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (2, 0), (3, 0), (1, 2), (3, 2)])
def test_limit_takes_the_first_rows_of_the_stream_once(sharded: Path, world_size: int, workers: int) -> None:
    """With limit=10, the first 10 rows of the stream (4 from shard 0, 6 from shard 1) come out once each."""
    per_rank = ids_per_rank(sharded, world_size, workers, limit=10)
    everything = [qid for ids in per_rank for qid in ids]
    assert sorted(everything) == [str(1000 + i) for i in range(10)]
    if workers == 0:  # dealt round-robin: rank r gets rows r, r + world_size, ...
        assert per_rank == [IDS[:10][rank::world_size] for rank in range(world_size)]


def test_skip_ids_are_not_yielded(sharded: Path) -> None:
    """Question ids already answered (a resumed run) are skipped; every other row still comes once."""
    skip = frozenset({"1000", "1017", "1036"})
    per_rank = ids_per_rank(sharded, 2, 0, skip_ids=skip)
    assert sorted(qid for ids in per_rank for qid in ids) == [qid for qid in IDS if qid not in skip]
    assert ids_per_rank(sharded, 1, 0, limit=3, skip_ids=frozenset({"1001"})) == [["1000", "1002"]]


def test_a_corrupt_image_row_comes_out_as_a_failed_sample(tmp_path: Path) -> None:
    """A row whose image cannot be decoded is a FailedSample with its question id; its neighbours are fine."""
    rows = [
        vqav2_row(7, "is it red?", ["yes"] * 10, image_cell(3, 2)),
        vqav2_row(8, "is it blue?", ["no"] * 10, CORRUPT_IMAGE),
        vqav2_row(9, "is it green?", ["no"] * 10, image_cell(2, 3)),
    ]
    folder = write_table(tmp_path, "vqav2", rows)
    items = list(BenchmarkStream(BENCHMARKS.get("vqav2")(), StreamSource(str(folder), None, "test")))
    assert [type(item) for item in items] == [Sample, FailedSample, Sample]
    assert items[1] == FailedSample(
        "8", "unreadable image: UnidentifiedImageError: cannot identify image file"
    )
    assert [items[0].question_id, items[2].question_id] == ["7", "9"]
    assert [items[0].image.size, items[2].image.size] == [(3, 2), (2, 3)]


def test_gqa_image_table_is_whole_in_every_dataloader_worker(tmp_path: Path) -> None:
    """With 2 workers, each worker joins its GQA questions to the full one-file image table."""
    questions = [
        {
            "id": f"q{i}",
            "imageId": f"n{i % 2}",
            "question": f"is shape {i} red?",
            "answer": "yes",
            "fullAnswer": "Yes, it is.",
            "isBalanced": True,
        }
        for i in range(5)
    ]
    write_table(tmp_path / "testdev_balanced_instructions", "gqa_instructions", questions, split="testdev")
    images = [{"id": "n0", "image": image_cell(4, 2)}, {"id": "n1", "image": image_cell(2, 4)}]
    write_table(tmp_path / "testdev_balanced_images", "gqa_images", images, split="testdev")
    stream = BenchmarkStream(
        BENCHMARKS.get("gqa")(), StreamSource(str(tmp_path), "testdev_balanced_instructions", "testdev")
    )
    items = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert all(isinstance(item, Sample) for item in items), [i for i in items if isinstance(i, FailedSample)]
    assert sorted((item.question_id, item.image.size) for item in items) == [
        ("q0", (4, 2)),
        ("q1", (2, 4)),
        ("q2", (4, 2)),
        ("q3", (2, 4)),
        ("q4", (4, 2)),
    ]


SUFFIX = "\nAnswer the question using a single word or phrase."
SUFFIX_TOKENS = ["answer", "the", "question", "using", "a", "single", "word", "or", "phrase", "."]


def sample(question_id: str, question: str, image: Image.Image | None) -> Sample:
    return Sample(question_id, question + SUFFIX, ["red"], image, {"category": "colour"})


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    return build_processor(image_size=64, patch_size=8)


def test_collator_builds_left_padded_llava_prompts(processor: LlavaProcessor) -> None:
    """Two usable rows: llava-1.5 prompts, left padding, 64 image tokens each, 64 px pixels, true sizes."""
    short = sample("a", "what color is the circle?", Image.new("RGB", (30, 20), (200, 30, 30)))
    long = sample(
        "b", "is there a red square in the top left corner?", Image.new("RGB", (16, 40), (0, 0, 255))
    )
    broken = FailedSample("c", "unreadable image: UnidentifiedImageError: cannot identify image file")
    imageless = sample("d", "what shape is it?", None)
    batch = PromptCollator(processor)([short, broken, imageless, long])

    assert isinstance(batch, PromptBatch) and len(batch) == 4
    assert batch.prompts == [
        "USER: <image>\nwhat color is the circle?" + SUFFIX + " ASSISTANT:",
        "USER: <image>\nis there a red square in the top left corner?" + SUFFIX + " ASSISTANT:",
    ]
    assert batch.image_sizes == [[(20, 30)], [(40, 16)]]  # (height, width) before preprocessing
    assert batch.failed == [broken, FailedSample("d", "the row has no image")]
    assert [(s.question_id, s.text, s.answers, s.image, s.meta) for s in batch.samples] == [
        ("a", short.text, ["red"], None, {"category": "colour"}),
        ("b", long.text, ["red"], None, {"category": "colour"}),
    ]

    # <s> + "user :" + 64 image tokens + question + suffix + "assistant :": 1 + 2 + 64 + 6 + 10 + 2 = 85
    # tokens for the short prompt and 1 + 2 + 64 + 11 + 10 + 2 = 90 for the long one, which sets the width.
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ids.shape == mask.shape == (2, 90)
    assert mask[0].tolist() == [0] * 5 + [1] * 85
    assert mask[1].tolist() == [1] * 90
    assert ids[0, :5].tolist() == [processor.tokenizer.pad_token_id] * 5
    tokens = [processor.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    first = ["what", "color", "is", "the", "circle", "?"]
    assert tokens[0][5:] == ["<s>", "user", ":", *["<image>"] * 64, *first, *SUFFIX_TOKENS, "assistant", ":"]
    question = ["is", "there", "a", "red", "square", "in", "the", "top", "left", "corner", "?"]
    assert tokens[1] == ["<s>", "user", ":", *["<image>"] * 64, *question, *SUFFIX_TOKENS, "assistant", ":"]

    # A one-colour image stays one colour through resize and crop: each channel is (v / 255 - mean) / std.
    pixels = batch.inputs["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for row, colour in enumerate([(200, 30, 30), (0, 0, 255)]):
        for channel in range(3):
            expected = (colour[channel] / 255 - mean[channel]) / std[channel]
            torch.testing.assert_close(
                pixels[row, channel], torch.full((64, 64), expected), atol=1e-5, rtol=0
            )


def test_collator_with_only_failed_rows_has_no_inputs(processor: LlavaProcessor) -> None:
    """A batch in which every row failed gives no model inputs, only the failed rows."""
    failed = [
        FailedSample("x", "unreadable image: OSError: truncated"),
        FailedSample("y", "the image cell is empty"),
    ]
    batch = PromptCollator(processor)(failed)
    assert batch.inputs is None
    assert (batch.samples, batch.prompts, batch.image_sizes) == ([], [], [])
    assert batch.failed == failed
    assert len(batch) == 2
