"""The PoRe presets' padding masks equal the authors' rules on a dense sweep of image sizes.

The authors (intcomp/attention-bias at e75ebe7) find the pad-to-square border two ways:

- FastV (threshold 0.5) and PyramidDrop (0.01) patches: `generate_pad_mask(width, height)`, the border at the
  continuous offset (side - size) / (2 side) of a 336 px square cut into 14 px patches; a patch whose padding
  share exceeds the threshold scores 0;
- SparseVLM patch (`--rm-padding`): `expand2square` also returns an 8-bit pixel mask (1 = image), which
  `process_images` resizes to 24 x 24 with PIL's bilinear filter and keeps where >= 0.5.

Both are written out here as the authors wrote them (`authors_generate_pad_mask`, `authors_bilinear_mask`,
checked on COCO's common sizes and a sample), and vectorised independently (numpy over all sizes at once; the
bilinear one re-implements PIL's fixed-point resampling, Resample.c) for the sweep: every width and height
from 16 to 2048 in steps of 16, plus COCO's common sizes. The library (`pore.priors.padding`) must agree on
every cell of every size.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import pore
from pore.priors.padding import PAD_RULES, padding_fraction

GRID, IMG_SIZE, PATCH = 24, 336, 14
COCO = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (375, 500), (640, 426), (640, 428)]
COCO += [(640, 425), (640, 424), (612, 612), (640, 360), (500, 333), (333, 500), (640, 512), (500, 500)]
SWEEP = [*itertools.product(range(16, 2049, 16), repeat=2), *COCO]  # (width, height)
SAMPLE = [*COCO, (16, 2048), (2048, 16), (336, 320), (1000, 999), (17, 16), (1024, 768), (768, 1024)]
PRESET_RULES = {  # preset: (pad_rule, pad_threshold) as the authors run it
    "pore_authors_fastv": ("generate_pad_mask", 0.5),
    "pore_authors_pdrop": ("generate_pad_mask", 0.01),
    "pore_authors_sparsevlm": ("bilinear_mask", 0.5),
}


# ---------------------------------------------------------------------------------------------------------
# The authors' code, as written (one size at a time).


def authors_generate_pad_mask(width: int, height: int, threshold: float) -> np.ndarray:
    """patches/FastV.patch and patches/PyramidDrop.patch, `generate_pad_mask` (grid 24, 336 px)."""
    patch_size = IMG_SIZE // GRID
    mask = np.zeros((GRID, GRID), dtype=int)
    if width < height:
        pad = (height - width) / (2 * height) * IMG_SIZE
        left, right, top, bottom = pad, IMG_SIZE - pad, 0, IMG_SIZE
    elif height < width:
        pad = (width - height) / (2 * width) * IMG_SIZE
        top, bottom, left, right = pad, IMG_SIZE - pad, 0, IMG_SIZE
    else:
        left, right, top, bottom = 0, IMG_SIZE, 0, IMG_SIZE
    for i in range(GRID):
        for j in range(GRID):
            x0, x1 = j * patch_size, (j + 1) * patch_size
            y0, y1 = i * patch_size, (i + 1) * patch_size
            inter_w = max(0, min(x1, right) - max(x0, left))
            inter_h = max(0, min(y1, bottom) - max(y0, top))
            pad_ratio = 1 - inter_w * inter_h / (patch_size * patch_size)
            mask[i, j] = 0 if pad_ratio > threshold else 1
    return mask.reshape(-1)


def authors_bilinear_mask(width: int, height: int) -> np.ndarray:
    """patches/SparseVLMs.patch, llava/mm_utils.py: expand2square's mask, resized to 24 x 24, >= 0.5."""
    if width == height:
        mask = Image.new("L", (width, height), 1)
    elif width > height:
        mask = Image.new("L", (width, width), 0)
        mask.paste(Image.new("L", (width, height), 1), (0, (width - height) // 2))
    else:
        mask = Image.new("L", (height, height), 0)
        mask.paste(Image.new("L", (width, height), 1), ((height - width) // 2, 0))
    resized = mask.resize((GRID, GRID), Image.Resampling.BILINEAR)
    return (np.array(resized).flatten().astype(np.float32) >= 0.5).astype(int)


# ---------------------------------------------------------------------------------------------------------
# The same rules vectorised over sizes: (S,) widths and heights -> (S, 576) masks.


def swept_generate_pad_mask(width: np.ndarray, height: np.ndarray, threshold: float) -> np.ndarray:
    pad_x = np.where(width < height, (height - width) / (2 * height) * IMG_SIZE, 0.0)  # (S,)
    pad_y = np.where(height < width, (width - height) / (2 * width) * IMG_SIZE, 0.0)
    left, right = pad_x, np.where(width < height, IMG_SIZE - pad_x, float(IMG_SIZE))
    top, bottom = pad_y, np.where(height < width, IMG_SIZE - pad_y, float(IMG_SIZE))
    x0 = np.arange(GRID) * PATCH  # (G,)
    inter_w = np.maximum(0, np.minimum(x0 + PATCH, right[:, None]) - np.maximum(x0, left[:, None]))  # (S, G)
    inter_h = np.maximum(0, np.minimum(x0 + PATCH, bottom[:, None]) - np.maximum(x0, top[:, None]))
    pad_ratio = 1 - inter_w[:, None, :] * inter_h[:, :, None] / (PATCH * PATCH)  # (S, rows, cols)
    return np.where(pad_ratio > threshold, 0, 1).reshape(len(width), -1)


PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c, 8 bits per channel


def pil_bilinear_1d(side: int, start: int, length: int) -> np.ndarray:
    """(G,) Pillow's 8-bit bilinear resize of a `side`-long 0/1 line (1 on [start, start + length)) to G
    values, as Resample.c computes it: precompute_coeffs (triangle filter widened by the scale, rows
    normalised), coefficients to fixed point, then (2^21 + sum coefficient x value) >> 22."""
    scale = side / GRID
    support = 1.0 * max(scale, 1.0)
    centre = (np.arange(GRID) + 0.5) * scale  # (G,)
    first = np.maximum(np.trunc(centre - support + 0.5), 0).astype(int)  # xmin
    last = np.minimum(np.trunc(centre + support + 0.5).astype(int), side)  # xmax before -= xmin
    taps = np.arange(int(np.ceil(support)) * 2 + 1)  # (K,)
    pixel = first[:, None] + taps[None, :]  # (G, K)
    used = taps[None, :] < (last - first)[:, None]
    weight = np.abs(((pixel - centre[:, None]) + 0.5) * (1.0 / max(scale, 1.0)))
    weight = np.where(used & (weight < 1.0), 1.0 - weight, 0.0)
    total = np.cumsum(weight, axis=1)[:, -1]  # summed in order, as the C loop
    fixed = np.floor(0.5 + weight / total[:, None] * (1 << PRECISION_BITS)).astype(np.int64)
    value = ((pixel >= start) & (pixel < start + length) & used).astype(np.int64)
    return ((1 << (PRECISION_BITS - 1)) + (fixed * value).sum(axis=1)) >> PRECISION_BITS


def swept_bilinear_mask(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    masks = np.ones((len(width), GRID, GRID), dtype=int)
    lines = {}
    for s, (w, h) in enumerate(zip(width.tolist(), height.tolist(), strict=True)):
        if w == h:
            continue
        side, length = max(w, h), min(w, h)
        if (side, length) not in lines:
            lines[side, length] = (pil_bilinear_1d(side, (side - length) // 2, length) >= 0.5).astype(int)
        line = lines[side, length]
        masks[s] = line[:, None] if w > h else line[None, :]  # wide: rows padded; tall: columns
    return masks.reshape(len(width), -1)


def library_masks(rule: str, threshold: float, sizes: list[tuple[int, int]]) -> np.ndarray:
    """(S, 576) 1 = kept by `pore.priors.padding` (a cell is border when its share exceeds the threshold)."""
    return np.stack(
        [(padding_fraction(GRID, GRID, h, w, rule) <= threshold).numpy().astype(int) for w, h in sizes]
    )


# ---------------------------------------------------------------------------------------------------------


def test_the_presets_use_their_methods_rule() -> None:
    for preset, (rule, threshold) in PRESET_RULES.items():
        prior = pore.build_strategy(preset).prior
        assert (prior.pad_rule, prior.pad_threshold) == (rule, threshold), preset
    assert pore.build_strategy("pore_exponential").prior.pad_rule == "expand2square_area"  # the default


@pytest.mark.parametrize("threshold", [0.5, 0.01])
def test_the_vectorised_references_are_the_authors_code(threshold: float) -> None:
    width, height = np.array([w for w, _ in SAMPLE]), np.array([h for _, h in SAMPLE])
    written = np.stack([authors_generate_pad_mask(w, h, threshold) for w, h in SAMPLE])
    assert np.array_equal(swept_generate_pad_mask(width, height, threshold), written)
    written = np.stack([authors_bilinear_mask(w, h) for w, h in SAMPLE])
    assert np.array_equal(swept_bilinear_mask(width, height), written)


@pytest.mark.parametrize("preset", sorted(PRESET_RULES))
def test_the_masks_equal_the_authors_rule_on_every_size(preset: str) -> None:
    rule, threshold = PRESET_RULES[preset]
    width, height = np.array([w for w, _ in SWEEP]), np.array([h for _, h in SWEEP])
    if rule == "generate_pad_mask":
        reference = swept_generate_pad_mask(width, height, threshold)
    else:
        reference = swept_bilinear_mask(width, height)
    ours = library_masks(rule, threshold, SWEEP)
    wrong = [SWEEP[s] for s in np.nonzero((ours != reference).any(axis=1))[0]]
    assert not wrong, f"{len(wrong)} sizes differ, e.g. {wrong[:5]}"


def test_the_rules_differ_where_the_issue_says() -> None:
    """COCO's 640 x 427 under PyramidDrop's threshold 0.01: 384 cells kept by the authors' continuous offset,
    360 by expand2square's integer offset measured in the image's pixels (this project's previous rule)."""
    authors = authors_generate_pad_mask(640, 427, 0.01)
    assert authors.sum() == 384 == library_masks("generate_pad_mask", 0.01, [(640, 427)]).sum()
    assert library_masks("expand2square_area", 0.01, [(640, 427)]).sum() == 360


def test_an_unknown_rule_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown strategy\.prior\.pad_rule 'pil'; valid rules: expand2square_area"
    ):
        pore.build_strategy("pore_authors_fastv", prior={"pad_rule": "pil"}).resolve()
    assert PAD_RULES == ("expand2square_area", "generate_pad_mask", "bilinear_mask")
    with pytest.raises(ValueError, match="unknown prior pad_rule"):
        padding_fraction(GRID, GRID, 10, 20, "pil")
    assert torch.equal(
        padding_fraction(GRID, GRID, 30, 30, "bilinear_mask"), torch.zeros(GRID * GRID).double()
    )
