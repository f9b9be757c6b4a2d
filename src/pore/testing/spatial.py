"""A synthetic spatial VQA benchmark: coloured shapes in the four quadrants, questions that need *where*.

Every scene is a 64 x 64 image split into four quadrants; each quadrant holds at most one shape (a circle, a
square or a triangle in one of five colours), jittered inside its quadrant. Questions ask about a place
(the colour or shape in a quadrant, whether a coloured shape is in a half) or count shapes, and have
single-word answers. The question types and the regions they ask about are balanced, so a model that only
sees the bottom of the image loses exactly half of the region questions.

The generator is deterministic: a split is a seed, and `python -m pore.testing.spatial OUT` writes the parquet
files
(`{split}-00000-of-00001.parquet`) in the schema that the data module reads.
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
HALVES = {"top": (0, 1), "bottom": (2, 3)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "exists", "count")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class Item:
    quadrant: int  # 0..3: top left, top right, bottom left, bottom right
    shape: str
    colour: str


def region_of(quadrant: int) -> str:
    return "top" if quadrant < 2 else "bottom"


def draw_scene(items: list[Item], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    for item in items:
        size = rng.randint(18, 24)
        left = (item.quadrant % 2) * half + rng.randint(2, half - size - 2)
        top = (item.quadrant // 2) * half + rng.randint(2, half - size - 2)
        box = (left, top, left + size, top + size)
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=fill)
    return image


def make_scene(rng: random.Random) -> list[Item]:
    occupied = sorted(rng.sample(range(4), rng.randint(2, 4)))
    return [Item(q, rng.choice(SHAPES), rng.choice(list(COLOURS))) for q in occupied]


def make_question(items: list[Item], kind: str, region: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of type `kind` about `region` ("top"/"bottom"; counts span the whole image)."""
    by_quadrant = {item.quadrant: item for item in items}
    quadrants = (
        [q for q in (0, 1) if q in by_quadrant]
        if region == "top"
        else [q for q in (2, 3) if q in by_quadrant]
    )
    if kind in ("colour", "shape"):
        quadrant = rng.choice(quadrants)
        item = by_quadrant[quadrant]
        if kind == "colour":
            return f"what colour is the shape in the {QUADRANTS[quadrant]}?", item.colour
        return f"what shape is in the {QUADRANTS[quadrant]}?", item.shape
    if kind == "exists":
        in_half = {(by_quadrant[q].shape, by_quadrant[q].colour) for q in HALVES[region] if q in by_quadrant}
        elsewhere = {(item.shape, item.colour) for item in items} - in_half
        if rng.random() < 0.5:
            shape, colour = rng.choice(sorted(in_half))
        elif elsewhere and rng.random() < 0.5:
            # A shape that is in the picture, but in the other half: only its place tells the answer.
            shape, colour = rng.choice(sorted(elsewhere))
        else:
            shape, colour = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in in_half])
        answer = "yes" if (shape, colour) in in_half else "no"
        return f"is there a {colour} {shape} in the {region} half?", answer
    shape = rng.choice(SHAPES)
    count = sum(item.shape == shape for item in items)
    return f"how many {shape}s are there?", NUMBER_WORDS[count]


def generate(split: str, samples: int) -> list[dict]:
    """`samples` rows of `split` (its own seed): question types and top/bottom regions in equal shares."""
    rng = random.Random(SPLIT_SEEDS[split] * 1_000_003 + samples)
    rows = []
    for index in range(samples):
        kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
        region = "top" if (index // len(QUESTION_TYPES)) % 2 == 0 else "bottom"
        while True:
            items = make_scene(rng)
            if any(region_of(item.quadrant) == region for item in items):
                break
        question, answer = make_question(items, kind, region, rng)
        buffer = io.BytesIO()
        draw_scene(items, rng).save(buffer, format="PNG")
        rows.append(
            {
                "question_id": f"{split}-{index:06d}",
                "question": question,
                "answer": answer,
                "type": kind,
                "region": "all" if kind == "count" else region,
                "image": {"bytes": buffer.getvalue(), "path": None},
            }
        )
    return rows


def write_split(folder: Path, split: str, samples: int) -> Path:
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "type": datasets.Value("string"),
            "region": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}-00000-of-00001.parquet"
    datasets.Dataset.from_list(generate(split, samples), features=features).to_parquet(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic spatial VQA splits as parquet files.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", action="append", choices=sorted(SPLIT_SEEDS), help="default: test")
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args(argv)
    for split in args.split or ["test"]:
        print(write_split(args.out, split, args.samples))


if __name__ == "__main__":
    main()
