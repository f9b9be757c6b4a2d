"""Does the last prompt token's attention to image tokens depend on their row? Measure it, and draw it.

    python scripts/attention_by_row.py --out docs/attention_by_row.png

Runs the embedded model unpruned over the shipped spatial test split. For each scoring layer (the layer
K-1 that FastV reads when pruning before layer K), it averages, over samples, the share of the last prompt
token's image attention that falls on each grid row (each sample's image attention normalised to sum to 1),
and compares it with the share of the *content*: how much of each row the shapes cover. A recency bias
shows as attention rising towards the bottom rows while the content share stays flat.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from pore import Pruner, build_strategy
from pore.app.config import asset_path
from pore.data import BENCHMARKS, BenchmarkStream, PromptCollator, StreamSource
from pore.testing.spatial import BACKGROUND

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def content_by_row(image: Image.Image, grid: int) -> torch.Tensor:
    """Share of non-background pixels in each of `grid` horizontal bands of the image."""
    pixels = torch.from_numpy(np.array(image, dtype=np.int16))  # (H, W, 3)
    drawn = (pixels - torch.tensor(BACKGROUND)).abs().sum(-1) > 30  # (H, W)
    per_band = drawn.view(grid, image.height // grid, image.width).float().sum(dim=(1, 2))
    return per_band / per_band.sum().clamp(min=1)


def measure(model_path: str, data_path: str, limit: int) -> tuple[dict[int, torch.Tensor], torch.Tensor, int]:
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    benchmark = BENCHMARKS.get("spatial")()
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    samples = list(BenchmarkStream(benchmark, StreamSource(data_path, None, "test", limit)))
    content = torch.stack([content_by_row(s.image, grid) for s in samples]).mean(0)
    collate = PromptCollator(processor)
    by_layer = {}
    layers = model.config.text_config.num_hidden_layers
    for k in range(1, layers):
        rows = []
        with Pruner(model, build_strategy("fastv", keep=grid * grid, layer=k)) as pruner, torch.no_grad():
            for start in range(0, len(samples), 32):
                batch = collate(samples[start : start + 32])
                model(**batch.inputs)
                record = pruner.last_record
                scores = record.scores.float()  # (B, N): attention (prior = 1), raster order
                shares = scores / scores.sum(dim=1, keepdim=True)
                rows.append(shares.view(-1, grid, grid).sum(dim=2))  # (B, rows)
        by_layer[k - 1] = torch.cat(rows).mean(0)
    return by_layer, content, len(samples)


def draw(by_layer: dict[int, torch.Tensor], content: torch.Tensor, path: Path) -> None:
    rows = len(content)
    width, height, margin = 640, 360, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top = max(float(v.max()) for v in [*by_layer.values(), content]) * 1.1
    x0, y0, x1, y1 = margin, 20, width - 150, height - margin
    draw.rectangle((x0, y0, x1, y1), outline="black")

    def point(row: int, value: float) -> tuple[float, float]:
        return x0 + (row + 0.5) * (x1 - x0) / rows, y1 - value / top * (y1 - y0)

    for row in range(rows):
        x, _ = point(row, 0)
        draw.text((x - 3, y1 + 5), str(row), fill="black")
    draw.text(((x0 + x1) / 2 - 60, y1 + 22), "image row (0 = top)", fill="black")
    draw.text((5, y0 - 15), "share of last-token attention to image tokens", fill="black")
    series = [
        (f"layer {layer}", values, COLOURS[i % len(COLOURS)])
        for i, (layer, values) in enumerate(by_layer.items())
    ]
    series.append(("content share", content, (120, 120, 120)))
    for i, (label, values, colour) in enumerate(series):
        points = [point(row, float(v)) for row, v in enumerate(values)]
        draw.line(points, fill=colour, width=3 if label != "content share" else 2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.line((x1 + 10, y0 + 15 + 20 * i, x1 + 30, y0 + 15 + 20 * i), fill=colour, width=3)
        draw.text((x1 + 35, y0 + 9 + 20 * i), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=asset_path("tiny-llava"))
    parser.add_argument("--data", default=asset_path("spatial-vqa"))
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("docs/attention_by_row.png"))
    args = parser.parse_args()
    by_layer, content, count = measure(args.model, args.data, args.limit)
    print(f"{count} samples; share of image attention by row (row 0 = top)")
    print("row     " + " ".join(f"{r:>6d}" for r in range(len(content))))
    for layer, values in by_layer.items():
        print(f"layer {layer} " + " ".join(f"{float(v):6.3f}" for v in values))
    print("content " + " ".join(f"{float(v):6.3f}" for v in content))
    draw(by_layer, content, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
