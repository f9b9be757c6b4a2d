"""Tiny random LLaVA-OneVision models, their inputs and independent references for the adapter tests.

Nothing here uses the pruning engine or the adapter: the expected token layouts are written out from the
anyres_max geometry worked by hand below, kept tokens come from eager attention with
`output_attentions=True`, and pruned forwards run layer by layer with the dropped tokens removed by plain
indexing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from pore.testing.tiny_onevision import build_onevision_processor, tiny_onevision_config

SIDE = 4  # 32 px encoder input, 8 px patches: a 4 x 4 grid per view
BASE_TOKENS = SIDE * SIDE

Size = tuple[int, int]  # (height, width) of an original image

# The high-resolution grid (rows, cols) a lone image of each size gets, worked by hand for pinpoints (h, w)
# 32 x 32, 32 x 64, 64 x 32, 64 x 64 (select_best_resolution: the largest effective resolution, then the
# least wasted canvas), unpadding, and anyres_max_2 (shrink when sqrt(H * W / (2 * 16)) > 1.1):
HIGH_RES: dict[Size, tuple[int, int]] = {
    # 2:1 -> 32 x 64 (800 px shown, 1248 wasted; 64 x 64 wastes more): 4 x 8, no crop; sqrt(32 / 32) = 1.
    (20, 40): (4, 8),
    # 30 x 30 -> 32 x 32 (900 px shown, 124 wasted): one tile, 4 x 4.
    (30, 30): (4, 4),
    # 0.625:1 -> 64 x 32 (1440 px): 8 x 4; height round(48 * 4 / 30) = 6: crop 1 row top and bottom: 6 x 4.
    (48, 30): (6, 4),
    # Square -> 64 x 64 (1600 px): 8 x 8; sqrt(64 / 32) = 1.41 > 1.1: shrunk to int(8 // 1.41) = 5 per side.
    (40, 40): (5, 5),
}


@dataclass(frozen=True)
class ExpectedToken:
    part: str  # "base", "high" or "newline"
    row: int
    col: int
    grid_h: int
    grid_w: int


def expected_tokens(size: Size, tiled: bool = True) -> list[ExpectedToken]:
    """Every visual token of one image, in sequence order: base raster, then (tiled) the high-resolution
    raster with a newline after each row, or (an image of a multi-image sample) one newline. A newline
    repeats the position of the token before it."""
    tokens = [ExpectedToken("base", r, c, SIDE, SIDE) for r in range(SIDE) for c in range(SIDE)]
    rows, cols = HIGH_RES[size] if tiled else (0, 0)
    for r in range(rows):
        tokens.extend(ExpectedToken("high", r, c, rows, cols) for c in range(cols))
        tokens.append(ExpectedToken("newline", r, cols - 1, rows, cols))
    if not tiled:
        tokens.append(ExpectedToken("newline", SIDE - 1, SIDE - 1, SIDE, SIDE))
    return tokens


def sample_tokens(sizes: Sequence[Size]) -> list[list[ExpectedToken]]:
    """Per image of one sample: its tokens (a sample with several images tiles none of them)."""
    return [expected_tokens(size, tiled=len(sizes) == 1) for size in sizes]


def prunable_counts(sizes: Sequence[Size]) -> list[int]:
    return [sum(t.part != "newline" for t in tokens) for tokens in sample_tokens(sizes)]


def newline_count(sizes: Sequence[Size]) -> int:
    return sum(t.part == "newline" for tokens in sample_tokens(sizes) for t in tokens)


# ---------------------------------------------------------------------------------------------- models


@functools.cache
def processor():
    return build_onevision_processor(SIDE * 8, 8)


def build_model(attn: str = "sdpa", layers: int = 4, seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """A random LLaVA-OneVision small enough for CPU tests; weights depend only on `seed` and `layers`.
    Generation has no end token, so every sample generates the same number of tokens alone or in a batch."""
    proc = processor()
    tokenizer = proc.tokenizer
    config = tiny_onevision_config(
        vocab_size=len(tokenizer),
        image_token_id=proc.image_token_id,
        video_token_id=proc.video_token_id,
        pad_token_id=tokenizer.pad_token_id,
        grid=SIDE,
        patch_size=8,
        text_layers=layers,
    )
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def image(size: Size, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


QUESTIONS = ("what colour is the circle?", "is there a red square in the top left?", "how many shapes?")


def prompt_inputs(images_per_sample: Sequence[Sequence[Size]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor outputs (left-padded) for samples with the given image sizes (nested per sample, so that
    the processor counts each sample's images); images are seeded noise."""
    proc = processor()
    texts, images = [], []
    for b, sizes in enumerate(images_per_sample):
        content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": QUESTIONS[b % len(QUESTIONS)]}]
        conversation = [{"role": "user", "content": content}]
        texts.append(proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
        images.append([image(size, seed=seed + 10 * b + i) for i, size in enumerate(sizes)])
    return dict(proc(images=images, text=texts, padding=True, return_tensors="pt"))


def sample_inputs(inputs: dict[str, torch.Tensor], b: int, images_before: int, images: int) -> dict:
    """Sample b of a batch, unpadded, with its own `images` images (the batch's images_before.. ones)."""
    real = inputs["attention_mask"][b].bool()
    chosen = slice(images_before, images_before + images)
    return dict(
        input_ids=inputs["input_ids"][b][real][None],
        attention_mask=inputs["attention_mask"][b][real][None],
        pixel_values=inputs["pixel_values"][chosen],
        image_sizes=inputs["image_sizes"][chosen],
        batch_num_images=torch.tensor([images]),
    )


# ---------------------------------------------------------------------------------------------- references


def image_positions(input_ids: torch.Tensor, sizes: Sequence[Size]) -> list[list[int]]:
    """Per image of one unpadded sample (1, L): the sequence positions of its visual tokens."""
    positions = (input_ids[0] == processor().image_token_id).nonzero().flatten().tolist()
    out, start = [], 0
    for tokens in sample_tokens(sizes):
        out.append(positions[start : start + len(tokens)])
        start += len(tokens)
    assert start == len(positions)
    return out


def reference_kept(
    model: LlavaOnevisionForConditionalGeneration,
    inputs: dict,
    sizes: Sequence[Size],
    layer: int,
    keep: int,
    weight: Callable[[int, int, int, int], float],
) -> list[list[int]]:
    """FastV x prior for one unpadded sample, from eager attention weights: per image, the sorted indices
    (among the image's prunable tokens in sequence order) of the `keep` best."""
    assert model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    last_row = out.attentions[layer - 1][0][:, -1, :].mean(dim=0).double()  # (L,) mean over heads
    kept = []
    for tokens, positions in zip(
        sample_tokens(sizes), image_positions(inputs["input_ids"], sizes), strict=True
    ):
        candidates = [(pos, t) for pos, t in zip(positions, tokens, strict=True) if t.part != "newline"]
        scores = [last_row[pos].item() * weight(t.row, t.col, t.grid_h, t.grid_w) for pos, t in candidates]
        ranking = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))  # ties: earlier first
        kept.append(sorted(ranking[:keep]))
    return kept


def kept_positions(input_ids: torch.Tensor, sizes: Sequence[Size], kept: list[list[int]]) -> torch.Tensor:
    """Sequence positions that survive pruning: text, every newline, and the kept prunable tokens."""
    dropped = set()
    for tokens, positions, chosen in zip(
        sample_tokens(sizes), image_positions(input_ids, sizes), kept, strict=True
    ):
        prunable = [p for p, t in zip(positions, tokens, strict=True) if t.part != "newline"]
        dropped.update(p for i, p in enumerate(prunable) if i not in set(chosen))
    return torch.tensor([i for i in range(input_ids.shape[1]) if i not in dropped])


def merged_embeddings(model: LlavaOnevisionForConditionalGeneration, inputs: dict) -> torch.Tensor:
    """(1, L, D): token embeddings with the packed image features in the image-token slots."""
    embeds = model.model.language_model.embed_tokens(inputs["input_ids"]).clone()
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"],
        batch_num_images=inputs["batch_num_images"],
    ).pooler_output
    embeds[inputs["input_ids"] == processor().image_token_id] = torch.cat(list(features)).to(embeds.dtype)
    return embeds


def reference_pruned_logits(
    model: LlavaOnevisionForConditionalGeneration, inputs: dict, layer: int, kept: torch.Tensor
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
