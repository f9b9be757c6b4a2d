"""Where LLaVA-1.5's pad-to-square border falls on the token grid (padding suppression).

LLaVA-1.5 pads a non-square image to a square of side max(h, w), pasting it centred at the integer offset
(side - size) // 2 (`expand2square`), then resizes the square to the encoder's input. Which grid cells count
as border is a rule (`strategy.prior.pad_rule`), one per code base that the PoRe presets follow:

- `expand2square_area` (this project's own rule, the default): the share of each cell's area that lies in
  the border, with the border where `expand2square` puts it (integer offset, measured in the image's pixels);
- `generate_pad_mask` (the PoRe authors' FastV and PyramidDrop patches, `generate_pad_mask`): the border at
  the continuous offset (side - size) / (2 side) of a 336 px square of 14 px patches, and the share of each
  patch's area that is border;
- `bilinear_mask` (the PoRe authors' SparseVLM patch, `process_images` with `--rm-padding`): expand2square's
  pixel mask (1 = image, 0 = border; an 8-bit PIL image) resized to the grid by PIL's bilinear filter, whose
  8-bit output is 0 or 1; the share is 1 minus that (so 0 or 1: any pad_threshold in [0, 1) reads it alike).

Each returns the border share of every cell, (grid_h * grid_w,) in raster order; a cell is border when its
share exceeds the prior's `pad_threshold`. (float64 numpy inside: a few hundred tiny operations per image,
where torch's per-operation overhead would dominate.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

PAD_RULES: tuple[str, ...] = ("expand2square_area", "generate_pad_mask", "bilinear_mask")
PATCH_PIXELS = 14  # generate_pad_mask: img_size // grid_size = 336 // 24 of LLaVA-1.5's encoder input


def padding_fraction(
    grid_h: int, grid_w: int, image_h: int, image_w: int, rule: str = "expand2square_area"
) -> torch.Tensor:
    """Share of each grid cell that is pad-to-square border under `rule`, float64 (grid_h * grid_w,)."""
    if image_h <= 0 or image_w <= 0:
        raise ValueError(f"image size must be positive, got {image_h} x {image_w}")
    if rule not in _CONTENT_SHARE:
        raise ValueError(f"unknown prior pad_rule {rule!r}; valid rules: {', '.join(PAD_RULES)}")
    share = _CONTENT_SHARE[rule]
    side = max(image_h, image_w)
    rows = share(grid_h, side, image_h)  # (grid_h,) content of each row of cells (share; px for the authors')
    cols = share(grid_w, side, image_w)  # (grid_w,)
    if rule == "generate_pad_mask":  # the authors' arithmetic: 1 - intersection area / patch area
        share = 1.0 - rows[:, None] * cols[None, :] / (PATCH_PIXELS * PATCH_PIXELS)
    else:
        share = 1.0 - rows[:, None] * cols[None, :]
    return torch.from_numpy(share.reshape(-1))


def _expand2square_share(cells: int, side: int, length: int) -> np.ndarray:
    """(cells,) share of each cell of a `side` px axis that holds the `length` px of image pasted at
    (side - length) // 2, in that axis's pixels."""
    start = (side - length) // 2
    edges = np.arange(cells + 1, dtype=np.float64) * side / cells
    low, high = edges[:-1], edges[1:]
    overlap = np.minimum(high, float(start + length)) - np.maximum(low, float(start))
    return np.maximum(overlap, 0.0) / (high - low)


def _generate_pad_mask_pixels(cells: int, side: int, length: int) -> np.ndarray:
    """(cells,) the content width in px of each 14 px patch, as `generate_pad_mask` measures it: the image
    spans [pad, size - pad) of the square's `cells * 14` px, pad = (side - length) / (2 side) * size (a float,
    not expand2square's integer offset). Computed with the authors' operations (max(0, min(x1, right) -
    max(x0, left))), so that their threshold compares bit for bit (`padding_fraction` divides the area)."""
    size = cells * PATCH_PIXELS
    if length < side:
        pad = (side - length) / (2 * side) * size
        low_edge, high_edge = pad, size - pad
    else:
        low_edge, high_edge = 0.0, float(size)
    x0 = np.arange(cells, dtype=np.float64) * PATCH_PIXELS
    inside = np.minimum(x0 + PATCH_PIXELS, high_edge) - np.maximum(x0, low_edge)
    return np.maximum(inside, 0.0)


def _bilinear_mask_share(cells: int, side: int, length: int) -> np.ndarray:
    """(cells,) 1.0 where PIL's bilinear resize of expand2square's 8-bit mask keeps the value 1, else 0.0.

    The mask is constant along the axis the image fills, so the 2-D resize of the authors' code is this
    one-axis resize of a `side` x 1 strip (PIL resamples each axis on its own; a constant axis stays exact).
    """
    if length >= side:
        return np.ones(cells, dtype=np.float64)
    strip = Image.new("L", (side, 1), 0)
    strip.paste(1, ((side - length) // 2, 0, (side - length) // 2 + length, 1))
    resized = np.asarray(strip.resize((cells, 1), Image.Resampling.BILINEAR))[0]  # (cells,) uint8 0 / 1
    return (resized >= 0.5).astype(np.float64)


_CONTENT_SHARE: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "expand2square_area": _expand2square_share,
    "generate_pad_mask": _generate_pad_mask_pixels,
    "bilinear_mask": _bilinear_mask_share,
}
