"""Where LLaVA-1.5's pad-to-square border falls on the token grid (padding suppression)."""

from __future__ import annotations

import torch


def padding_fraction(grid_h: int, grid_w: int, image_h: int, image_w: int) -> torch.Tensor:
    """Share of each grid cell's area that lies in the pad-to-square border, shape (grid_h * grid_w,).

    LLaVA-1.5 pads a non-square image to a square of side max(h, w), pasting it centred (offset
    (side - size) // 2, as `expand2square` does), then resizes the square to the encoder's input. Cell (r, c)
    of the token grid covers [r, r + 1) * side / grid_h by [c, c + 1) * side / grid_w of that square.
    """
    if image_h <= 0 or image_w <= 0:
        raise ValueError(f"image size must be positive, got {image_h} x {image_w}")
    side = max(image_h, image_w)
    top, left = (side - image_h) // 2, (side - image_w) // 2

    def content_share(cells: int, start: int, length: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) * side / cells
        low, high = edges[:-1], edges[1:]
        overlap = torch.minimum(high, torch.tensor(float(start + length))) - torch.maximum(
            low, torch.tensor(float(start))
        )
        return overlap.clamp(min=0) / (high - low)

    rows = content_share(grid_h, top, image_h)  # (grid_h,)
    cols = content_share(grid_w, left, image_w)  # (grid_w,)
    return (1.0 - rows[:, None] * cols[None, :]).reshape(-1)
