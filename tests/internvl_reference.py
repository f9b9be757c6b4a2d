"""Tiny InternVL3 inputs and independent references for the contract and adapter tests.

Nothing here uses the pruning engine. Each image's views (tiles + thumbnail) come from the image processor's
own `num_patches`; its tokens are read off the prompt as the run of `<IMG_CONTEXT>` between `<img>` and
`</img>`; token k of an image lies in view k // 16 at (row, col) = divmod(k % 16, 4) (the adapter test
checks that against the model's own pixel shuffle). The kept set comes from eager attention with
`output_attentions=True`; the pruned forward runs the decoder layers one by one with the dropped tokens
removed by plain indexing (kept tokens keep their RoPE positions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers.masking_utils import create_causal_mask

from pore.testing.tiny_internvl import (
    END_IMAGE,
    START_IMAGE,
    TOKENS_PER_TILE,
    build_internvl_processor,
    build_tiny_internvl,
)

SIDE = int(TOKENS_PER_TILE**0.5)  # 4 x 4 tokens per view

# (question, image sizes (height, width)): 1 view (a single tile), 3 views (2 tiles + thumbnail) and 5 views
# (2 x 2 tiles + thumbnail); different prompt lengths and numbers of images.
SAMPLES: list[tuple[str, list[tuple[int, int]]]] = [
    ("what colour is the circle?", [(32, 32)]),
    ("is there a red square in the top left corner of the image?", [(40, 80), (32, 32)]),
    ("how many shapes?", [(64, 64)]),
]

Weight = Callable[[int, int, int, int], float]


@functools.cache
def processor():
    return build_internvl_processor()


@functools.cache
def tiny_model(attn: str = "sdpa"):
    """One model per attention implementation for the whole session (tests detach their pruners)."""
    return build_tiny_internvl(len(processor().tokenizer), attn_implementation=attn)


def image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def prompt(question: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor().apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def sample_images(b: int, seed: int = 0) -> list[Image.Image]:
    return [image(size, seed=1000 * seed + 10 * b + i) for i, size in enumerate(SAMPLES[b][1])]


def make_inputs(samples: Sequence[tuple[str, list[tuple[int, int]]]] = SAMPLES, seed: int = 0) -> dict:
    """The processor's output for `samples` (left-padded batch): input_ids, attention_mask, pixel_values."""
    images = [sample_images(b, seed) for b in range(len(samples))]
    texts = [prompt(question, len(sizes)) for question, sizes in samples]
    return dict(processor()(images=images, text=texts, padding=True, return_tensors="pt"))


def sample_inputs(b: int, seed: int = 0) -> dict:
    """SAMPLES[b] alone, with the pixels it has inside a batch built with the same seed."""
    question, sizes = SAMPLES[b]
    return dict(
        processor()(images=[sample_images(b, seed)], text=[prompt(question, len(sizes))], return_tensors="pt")
    )


@functools.cache
def views(b: int) -> list[int]:
    """Views (tiles + thumbnail) of each image of sample b, as the image processor counts them."""
    counted = processor().image_processor(sample_images(b), return_tensors="pt")["num_patches"]
    return [int(n) for n in counted]


def prunable(b: int) -> list[int]:
    return [TOKENS_PER_TILE * n for n in views(b)]


def image_runs(input_ids: torch.Tensor) -> list[list[int]]:
    """Per image of one unpadded sample (1, L): the positions between its `<img>` and `</img>`."""
    tokenizer = processor().tokenizer
    start, end = tokenizer.convert_tokens_to_ids([START_IMAGE, END_IMAGE])
    ids = input_ids[0].tolist()
    runs, current = [], None
    for position, token in enumerate(ids):
        if token == start:
            current = []
        elif token == end:
            runs.append(current)
            current = None
        elif current is not None:
            current.append(position)
    return runs


def grid_place(k: int) -> tuple[int, int, int]:
    """(view, row, col) of an image's k-th token."""
    view, within = divmod(k, TOKENS_PER_TILE)
    return view, within // SIDE, within % SIDE


def reference_kept(model, inputs: dict, layer: int, keep: int, weight: Weight) -> list[list[int]]:
    """FastV x prior for one unpadded sample from eager attention: per image, the sorted indices (in the
    image's sequence order) of its `keep` best tokens over all its views; `weight(row, col, 4, 4)` is the
    prior's weight of a token at its place in its view."""
    assert model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    last_row = out.attentions[layer - 1][0][:, -1, :].mean(dim=0).double()  # (L,) mean over heads
    kept = []
    for positions in image_runs(inputs["input_ids"]):
        places = [grid_place(k) for k in range(len(positions))]
        scores = [
            last_row[p].item() * weight(r, c, SIDE, SIDE)
            for p, (_, r, c) in zip(positions, places, strict=True)
        ]
        ranking = sorted(range(len(positions)), key=lambda i: (-scores[i], i))  # ties: earlier first
        kept.append(sorted(ranking[:keep]))
    return kept


def kept_positions(inputs: dict, kept: list[list[int]]) -> torch.Tensor:
    """Sequence positions that survive pruning: everything but the image tokens not in `kept`."""
    dropped = set()
    for positions, chosen in zip(image_runs(inputs["input_ids"]), kept, strict=True):
        dropped.update(p for i, p in enumerate(positions) if i not in set(chosen))
    return torch.tensor([i for i in range(inputs["input_ids"].shape[1]) if i not in dropped])


def reference_pruned_logits(model, inputs: dict, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose positions outside `kept` are removed by hand from
    decoder layer `layer` on (kept tokens keep their original RoPE positions)."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1
    base = model.model
    language_model = base.language_model
    with torch.no_grad():
        hidden = base.get_input_embeddings()(input_ids).clone()  # (1, L, D)
        features = base.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output  # (views, 16, D)
        hidden[input_ids == model.config.image_token_id] = features.reshape(-1, hidden.shape[-1]).to(
            hidden.dtype
        )
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


def append_token(inputs: dict, token: int) -> dict:
    sequence = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    return {**inputs, "input_ids": sequence, "attention_mask": torch.ones_like(sequence)}


def until_eos(tokens, eos: int = 2) -> list[int]:
    """The answer before <|im_end|> (generate() pads finished samples of a batch)."""
    out = []
    for token in map(int, tokens):
        if token == eos:
            break
        out.append(token)
    return out
