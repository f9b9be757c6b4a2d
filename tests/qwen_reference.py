"""Tiny Qwen2-VL / Qwen2.5-VL inputs and independent references for the Qwen adapter tests.

Nothing here uses the pruning engine: kept tokens come from eager attention with `output_attentions=True` and
image boundaries read off `image_grid_thw` by hand; the pruned forward runs the decoder layers one by one with
the dropped tokens removed by plain indexing, the 3-D M-RoPE positions coming from the model's own
`get_rope_index`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers.masking_utils import create_causal_mask

from pore.testing.tiny_qwen import build_qwen_processor, build_tiny_qwen

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
MERGE = 2  # spatial_merge_size of the tiny models
PIXELS_PER_TOKEN = 14  # patch 7 x merge 2: one language-model token per 14 x 14 pixels

# (question, image sizes (height, width)): different prompt lengths, grid shapes and numbers of images.
# Grids in tokens: 56 x 56 -> 4 x 4, 42 x 70 -> 3 x 5, 56 x 28 -> 4 x 2, 70 x 42 -> 5 x 3.
SAMPLES: list[tuple[str, list[tuple[int, int]]]] = [
    ("what colour is the circle?", [(56, 56)]),
    ("is there a red square in the top left corner of the image?", [(42, 70), (56, 28)]),
    ("how many shapes?", [(70, 42)]),
]

# A prior as the tests write it independently: weight of each token from (row, raster index, H, N).
Weights = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def no_prior(row: torch.Tensor, raster: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    return torch.ones(len(row), dtype=torch.float64)


def linear_rows(alpha: float) -> Weights:
    """w = 1 - alpha * row / (H - 1)."""
    return lambda row, raster, rows, tokens: 1.0 - alpha * row.double() / max(rows - 1, 1)


def exponential(sigma: float, position: str = "row") -> Weights:
    """w = exp(-sigma * p), p = row / (H - 1) or raster index / (N - 1)."""

    def weights(row: torch.Tensor, raster: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
        p = row.double() / max(rows - 1, 1) if position == "row" else raster.double() / max(tokens - 1, 1)
        return torch.tensor([math.exp(-sigma * float(x)) for x in p], dtype=torch.float64)

    return weights


@functools.cache
def processor(family: str):
    # The image-only variant, so the tests do not depend on whether torchvision is installed.
    return build_qwen_processor(family, images_only=True)


@functools.cache
def tiny_model(family: str, attn: str = "sdpa", layers: int = 4):
    """One model per setting for the whole session: every test detaches its pruner (context manager)."""
    return build_tiny_qwen(
        family, vocab_size=len(processor(family).tokenizer), attn_implementation=attn, text_layers=layers
    )


def image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def prompt(family: str, question: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor(family).apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def make_inputs(family: str, samples: Sequence[tuple[str, list[tuple[int, int]]]], seed: int = 0) -> dict:
    """The processor's output for `samples` (left-padded batch): input_ids, attention_mask,
    mm_token_type_ids, pixel_values, image_grid_thw. Image pixels depend on (seed, sample, image)."""
    images = [
        [image(size, seed=1000 * seed + 10 * b + i) for i, size in enumerate(sizes)]
        for b, (_, sizes) in enumerate(samples)
    ]
    texts = [prompt(family, question, len(sizes)) for question, sizes in samples]
    return dict(processor(family)(images=images, text=texts, padding=True, return_tensors="pt"))


def sample_inputs(family: str, index: int, seed: int = 0) -> dict:
    """SAMPLES[index] alone, with the same pixels it has inside a batch built with the same seed."""
    question, sizes = SAMPLES[index]
    images = [image(size, seed=1000 * seed + 10 * index + i) for i, size in enumerate(sizes)]
    text = prompt(family, question, len(sizes))
    return dict(processor(family)(images=[images], text=[text], return_tensors="pt"))


def image_spans(inputs: dict, image_token_id: int) -> list[tuple[torch.Tensor, int, int]]:
    """(sequence positions, rows, cols) of each image of a one-sample prompt, by hand from image_grid_thw."""
    positions = (inputs["input_ids"][0] == image_token_id).nonzero().flatten()
    spans, start = [], 0
    for t, h, w in inputs["image_grid_thw"].tolist():
        rows, cols = h // MERGE, w // MERGE
        spans.append((positions[start : start + t * rows * cols], rows, cols))
        start += t * rows * cols
    assert start == len(positions)
    return spans


def reference_kept_raster(model, inputs: dict, layer: int, keep: int, weights: Weights) -> list[list[int]]:
    """FastV's choice for one unpadded sample from eager attention weights: per image, sorted raster ids."""
    assert model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    attention = out.attentions[layer - 1][0]  # (H, L, L) of the only sample
    last_row = attention[:, -1, :].mean(dim=0).double()  # (L,)
    kept = []
    for positions, rows, cols in image_spans(inputs, model.config.image_token_id):
        raster = torch.arange(len(positions))
        scores = last_row[positions] * weights(raster // cols, raster, rows, len(positions))
        # Highest score first; equal scores: earlier token first.
        ranking = sorted(range(len(positions)), key=lambda i: (-scores[i].item(), i))
        kept.append(sorted(ranking[:keep]))
    return kept


def kept_positions(inputs: dict, image_token_id: int, kept_raster: list[list[int]]) -> torch.Tensor:
    """Sequence positions that survive pruning in a single-sample prompt: text plus the kept image tokens."""
    length = inputs["input_ids"].shape[1]
    dropped = set()
    for (positions, _, _), raster in zip(image_spans(inputs, image_token_id), kept_raster, strict=True):
        dropped |= set(positions.tolist()) - {int(positions[r]) for r in raster}
    return torch.tensor([i for i in range(length) if i not in dropped])


def reference_pruned_logits(model, inputs: dict, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose tokens outside `kept` are removed by hand from decoder
    layer `layer` on; kept tokens keep their original 3-D M-RoPE positions (from `get_rope_index`)."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1
    base = model.model
    language_model = base.language_model
    with torch.no_grad():
        hidden = base.get_input_embeddings()(input_ids)
        features = torch.cat(
            list(base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        )
        is_image = (input_ids == model.config.image_token_id)[..., None].expand_as(hidden)
        hidden = hidden.masked_scatter(is_image, features.to(hidden.dtype))
        positions, _ = base.get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )  # (3, 1, L)
        cos, sin = language_model.rotary_emb(hidden, positions)  # (1, L, head_dim) each
        config = language_model.config
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=None
        )
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
                mask = create_causal_mask(
                    config=config,
                    inputs_embeds=hidden,
                    attention_mask=None,
                    past_key_values=None,
                    position_ids=None,
                )
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None
            )
        return model.lm_head(language_model.norm(hidden))


def append_token(inputs: dict, token: int) -> dict:
    """The single-sample inputs with one more text token at the end (for a greedy loop without cache)."""
    grown = dict(inputs)
    grown["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    grown["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], dim=1
    )
    if "attention_mask" in inputs:
        grown["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1
        )
    return grown


def until_eos(tokens: torch.Tensor | list[int], eos: int = 2) -> list[int]:
    """Generated tokens up to and including the first <|im_end|> (a batch pads after it, one sample stops)."""
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def video_inputs(family: str, seed: int = 0) -> dict:
    """A tiny video (4 frames of 28 x 28 px: t = 2 temporal patches of 2 x 2 tokens) then a 28 x 28 image, in
    one prompt, as the model takes them: placeholders, M-RoPE token types and seeded noise patches (the video
    processor needs torchvision, so the pixels are written directly in the processor's patch layout)."""
    config = tiny_model(family).config
    vision = config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    video, image = config.video_token_id, config.image_token_id
    start, end = config.vision_start_token_id, config.vision_end_token_id
    ids = [1, start] + [video] * 8 + [end, 40, start] + [image] * 4 + [end, 41, 42]
    input_ids = torch.tensor([ids])
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": ((input_ids == image).long() + 2 * (input_ids == video).long()),
        "pixel_values_videos": torch.randn(2 * 4 * 4, patch, generator=generator),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
        "pixel_values": torch.randn(4 * 4, patch, generator=generator),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
