"""Tiny random LLaVA-NeXT models, their inputs and independent references for the adapter tests.

Nothing here uses the pruning engine or the adapter: the expected token layouts are written out from the
anyres geometry worked by hand below, kept tokens come from eager attention with `output_attentions=True`,
and pruned forwards run layer by layer with the dropped tokens removed by plain indexing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.masking_utils import create_causal_mask

from pore.testing.tiny_llava import IMAGE_TOKEN
from pore.testing.tiny_next import build_next_processor, tiny_llava_next_config

SIDE = 4  # 32 px encoder input, 8 px patches: a 4 x 4 grid per view
BASE_TOKENS = SIDE * SIDE

Size = tuple[int, int]  # (height, width) of an original image


@dataclass(frozen=True)
class Geometry:
    """How the tiny model tiles one image: tiles (rows, cols) of the chosen pinpoint, and the rows / cols of
    the (tile_rows * 4) x (tile_cols * 4) high-resolution grid that survive unpadding."""

    tiles: tuple[int, int]
    rows: range
    cols: range


# Worked by hand for pinpoints (h, w) 32 x 64, 64 x 32, 64 x 64 (transformers' select_best_resolution: the
# largest effective resolution min(scaled area, original area), then the least wasted canvas), and unpadding
# (crop (current - round(original * scale)) // 2 feature rows or cols on both sides):
GEOMETRY: dict[Size, Geometry] = {
    # 2:1. 32 x 64 and 64 x 64 both show 800 px; 32 x 64 wastes less. Scaled 4 x 8 exactly: no crop.
    (20, 40): Geometry((1, 2), range(0, 4), range(0, 8)),
    # 0.625:1 -> 64 x 32 (1440 px, less waste than 64 x 64). Height round(48 * 4 / 30) = 6 of 8: crop 1 row
    # top and bottom.
    (48, 30): Geometry((2, 1), range(1, 7), range(0, 4)),
    # 1.5:1 -> 32 x 64 (1350 px). Width round(45 * 4 / 30) = 6 of 8: crop 1 col left and right.
    (30, 45): Geometry((1, 2), range(0, 4), range(1, 7)),
    # Square -> 64 x 64 (1600 px, the others show 1024): 8 x 8, no crop.
    (40, 40): Geometry((2, 2), range(0, 8), range(0, 8)),
}


@dataclass(frozen=True)
class ExpectedToken:
    part: str  # "base", "high" or "newline"
    row: int  # in the token's grid, for the frame asked for
    col: int
    grid_h: int
    grid_w: int
    view: int  # which encoder input it comes from: 0 = base view, 1 + tile index (row-major) otherwise
    in_view: int  # raster index inside that view's 4 x 4 grid (-1 for a newline)


def expected_tokens(size: Size, frame: str = "image") -> list[ExpectedToken]:
    """Every visual token of one image, in sequence order: base raster, then the unpadded high-resolution
    raster with a newline after each row. A newline repeats the position of the token before it."""
    geometry = GEOMETRY[size]
    tokens = [
        ExpectedToken("base", r, c, SIDE, SIDE, 0, r * SIDE + c) for r in range(SIDE) for c in range(SIDE)
    ]
    height, width = len(geometry.rows), len(geometry.cols)
    for i, r in enumerate(geometry.rows):
        for j, c in enumerate(geometry.cols):
            view = 1 + (r // SIDE) * geometry.tiles[1] + c // SIDE
            in_view = (r % SIDE) * SIDE + c % SIDE
            if frame == "image":
                tokens.append(ExpectedToken("high", i, j, height, width, view, in_view))
            else:
                tokens.append(ExpectedToken("high", r % SIDE, c % SIDE, SIDE, SIDE, view, in_view))
        last = tokens[-1]
        tokens.append(ExpectedToken("newline", last.row, last.col, last.grid_h, last.grid_w, -1, -1))
    return tokens


def prunable_tokens(size: Size, frame: str = "image") -> list[ExpectedToken]:
    return [t for t in expected_tokens(size, frame) if t.part != "newline"]


# ---------------------------------------------------------------------------------------------- models


@functools.cache
def processor() -> LlavaNextProcessor:
    return build_next_processor(SIDE * 8, 8)


def image_token_id() -> int:
    return processor().tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def build_model(attn: str = "sdpa", layers: int = 4, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """A random LLaVA-NeXT small enough for CPU tests; weights depend only on `seed` and `layers`.

    The large init std (0.2) makes attention peaked, so top-k choices are well separated. Generation has no
    end token, so every sample generates the same number of tokens alone or in a batch.
    """
    tokenizer = processor().tokenizer
    config = tiny_llava_next_config(
        vocab_size=len(tokenizer),
        image_token_id=image_token_id(),
        pad_token_id=tokenizer.pad_token_id,
        grid=SIDE,
        patch_size=8,
        text_layers=layers,
    )
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def image(size: Size, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


QUESTIONS = ("what colour is the circle?", "is there a red square in the top left?", "how many shapes?")


def prompt_inputs(
    images_per_sample: Sequence[Sequence[Size]], questions: Sequence[str] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Processor outputs (left-padded) for samples with the given image sizes; images are seeded noise."""
    proc = processor()
    questions = questions or [QUESTIONS[b % len(QUESTIONS)] for b in range(len(images_per_sample))]
    texts, images = [], []
    for b, (sizes, question) in enumerate(zip(images_per_sample, questions, strict=True)):
        content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": question}]
        conversation = [{"role": "user", "content": content}]
        texts.append(proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
        images.extend(image(size, seed=seed + 10 * b + i) for i, size in enumerate(sizes))
    return dict(proc(images=images, text=texts, padding=True, return_tensors="pt"))


def sample_inputs(inputs: dict[str, torch.Tensor], b: int, images_before: int, images: int) -> dict:
    """Sample b of a batch, unpadded, with its own `images` images (the batch's images_before.. ones)."""
    real = inputs["attention_mask"][b].bool()
    pixel_values = inputs["pixel_values"][images_before : images_before + images]
    return dict(
        input_ids=inputs["input_ids"][b][real][None],
        attention_mask=inputs["attention_mask"][b][real][None],
        pixel_values=pixel_values,
        image_sizes=inputs["image_sizes"][images_before : images_before + images],
    )


# ---------------------------------------------------------------------------------------------- references


def image_positions(input_ids: torch.Tensor, sizes: Sequence[Size]) -> list[list[int]]:
    """Per image of one unpadded sample (1, L): the sequence positions of its visual tokens."""
    positions = (input_ids[0] == image_token_id()).nonzero().flatten().tolist()
    out, start = [], 0
    for size in sizes:
        count = len(expected_tokens(size))
        out.append(positions[start : start + count])
        start += count
    assert start == len(positions)
    return out


def reference_kept(
    model: LlavaNextForConditionalGeneration,
    inputs: dict,
    sizes: Sequence[Size],
    layer: int,
    keep: int,
    weight: Callable[[int, int, int, int], float],
    frame: str = "image",
) -> list[list[int]]:
    """FastV x prior for one unpadded sample, from eager attention weights: per image, the sorted indices
    (among the image's prunable tokens in sequence order) of the `keep` best; `weight(row, col, grid_h,
    grid_w)` is the prior's weight of a token at its position in `frame`."""
    assert model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    last_row = out.attentions[layer - 1][0][:, -1, :].mean(dim=0).double()  # (L,) mean over heads
    kept = []
    for size, positions in zip(sizes, image_positions(inputs["input_ids"], sizes), strict=True):
        tokens = expected_tokens(size, frame)
        candidates = [(pos, t) for pos, t in zip(positions, tokens, strict=True) if t.part != "newline"]
        scores = [last_row[pos].item() * weight(t.row, t.col, t.grid_h, t.grid_w) for pos, t in candidates]
        # Highest score first; equal scores: earlier token first.
        ranking = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
        kept.append(sorted(ranking[:keep]))
    return kept


def kept_positions(input_ids: torch.Tensor, sizes: Sequence[Size], kept: list[list[int]]) -> torch.Tensor:
    """Sequence positions that survive pruning: text, every newline, and the kept prunable tokens."""
    dropped = set()
    for size, positions, chosen in zip(sizes, image_positions(input_ids, sizes), kept, strict=True):
        prunable = [p for p, t in zip(positions, expected_tokens(size), strict=True) if t.part != "newline"]
        dropped.update(p for i, p in enumerate(prunable) if i not in set(chosen))
    return torch.tensor([i for i in range(input_ids.shape[1]) if i not in dropped])


def merged_embeddings(model: LlavaNextForConditionalGeneration, inputs: dict) -> torch.Tensor:
    """(1, L, D): token embeddings with the packed image features in the image-token slots."""
    embeds = model.model.language_model.embed_tokens(inputs["input_ids"]).clone()
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    ).pooler_output
    embeds[inputs["input_ids"] == image_token_id()] = torch.cat(list(features)).to(embeds.dtype)
    return embeds


def reference_pruned_logits(
    model: LlavaNextForConditionalGeneration, inputs: dict, layer: int, kept: torch.Tensor
) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose positions outside `kept` are removed by hand from
    decoder layer `layer` on (kept tokens keep their original RoPE positions)."""
    assert inputs["input_ids"].shape[0] == 1
    language_model = model.model.language_model
    with torch.no_grad():
        hidden = merged_embeddings(model, inputs)
        positions = torch.arange(hidden.shape[1])[None]
        cos, sin = language_model.rotary_emb(hidden, positions)
        mask = create_causal_mask(language_model.config, hidden, None, None, positions)
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
                positions = positions[:, kept]
                mask = create_causal_mask(language_model.config, hidden, None, None, None)
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions
            )
        return model.lm_head(language_model.norm(hidden))
