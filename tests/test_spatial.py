"""The synthetic spatial benchmark: deterministic, balanced, answers consistent with the scenes."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pore.metrics import SpatialAccuracy
from pore.testing.spatial import (
    COLOURS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SHAPES,
    Item,
    draw_scene,
    generate,
    make_question,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def test_generation_is_deterministic_and_balanced() -> None:
    rows = generate("val", 200)
    assert [r["question"] for r in rows] == [r["question"] for r in generate("val", 200)]
    assert [r["image"]["bytes"] for r in rows[:5]] == [r["image"]["bytes"] for r in generate("val", 200)[:5]]
    counts = Counter((r["type"], r["region"]) for r in rows)
    for kind in ("colour", "shape", "exists"):
        assert counts[(kind, "top")] == counts[(kind, "bottom")] == 25
    assert counts[("count", "all")] == 50
    answers = {r["answer"] for r in rows}
    assert answers <= set(COLOURS) | set(SHAPES) | {"yes", "no"} | set(NUMBER_WORDS)
    assert (
        generate("train", 50)[0]["question"] != rows[0]["question"]
        or generate("train", 50)[0]["image"] != rows[0]["image"]
    )


def test_answers_follow_the_scene() -> None:
    import random

    items = [Item(0, "circle", "red"), Item(3, "square", "blue"), Item(2, "square", "green")]
    rng = random.Random(0)
    for _ in range(50):
        question, answer = make_question(items, "colour", "top", rng)
        assert (question, answer) == ("what colour is the shape in the top left?", "red")
        question, answer = make_question(items, "shape", "bottom", rng)
        assert answer == "square" and ("bottom left" in question or "bottom right" in question)
        question, answer = make_question(items, "exists", "top", rng)
        assert answer == ("yes" if question == "is there a red circle in the top half?" else "no")
        question, answer = make_question(items, "count", "all", rng)
        expected = {"circles": "one", "squares": "two", "triangles": "zero"}
        assert answer == expected[question.split()[2]]
    image = draw_scene(items, random.Random(1))
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.int64))  # (64, 64, 3)
    assert (pixels[:32, :32] == torch.tensor(COLOURS["red"])).all(-1).any()  # the red circle is top left
    assert not (pixels[:32, 32:] != torch.tensor([245, 245, 245])).any()  # top right is empty


def test_shipped_split_is_the_generated_one() -> None:
    shipped = datasets.load_dataset(str(ASSETS / "spatial-vqa"), split="test")
    rows = generate("test", len(shipped))
    assert len(shipped) == 400
    assert shipped["question"] == [r["question"] for r in rows]
    assert shipped["answer"] == [r["answer"] for r in rows]
    first = shipped.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert Image.open(io.BytesIO(first)).size == (64, 64) and first == rows[0]["image"]["bytes"]


def test_spatial_metric_by_region_and_type() -> None:
    metric = SpatialAccuracy()
    metric.update(
        ["red", "blue", "yes", "two", "circle"],
        [["red"], ["green"], ["yes"], ["two"], ["square"]],
        regions=["top", "top", "bottom", "all", "bottom"],
        types=["colour", "colour", "exists", "count", "shape"],
    )
    values = {k: float(v) for k, v in metric.compute().items()}
    assert values["acc"] == pytest.approx(3 / 5)
    assert values["acc_top"] == pytest.approx(1 / 2) and values["acc_bottom"] == pytest.approx(1 / 2)
    assert values["acc_all"] == 1.0 and values["acc_colour"] == 0.5 and values["acc_shape"] == 0.0
    with pytest.raises(ValueError, match="valid regions: top, bottom, all"):
        metric.update(["x"], [["x"]], regions=["middle"], types=["colour"])
    assert set(QUESTION_TYPES) == {"colour", "shape", "exists", "count"}
