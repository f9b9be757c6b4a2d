"""Independent references for Gemma 4 (tests/families.py), written against the untouched tiny model.

Nothing here uses the pruning engine or transformers' mask builders: the kept set comes from eager attention
weights (`output_attentions=True`), and the pruned forward runs the decoder layers by hand on the kept
tokens: each layer gets the kept rows of its per-layer input embeddings, the layers pass each other their
shared keys / values (the KV-shared layers read them), and the masks are written out here: causal, and in
the sliding-window layers OR the bidirectional block of each image's kept tokens, AND a window of
`sliding_window` positions of the shortened sequence (the full layers stay causal).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from pore.testing.tiny_gemma4 import (
    AUDIO_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    build_tiny_gemma4,
    gemma4_pixels,
    gemma4_prompt,
)

# (prefix, image grids (rows, cols), suffix): different prompt lengths, numbers and sizes of images, all
# longer than the window (8).
# Text ids from 13 on: 0-12 are the special tokens (`GEMMA4_SPECIAL_TOKENS`).
PROMPTS = [
    ([13, 14, 15], [(2, 3)], [16, 17, 18, 19]),
    ([20], [(3, 3), (2, 2)], [21, 22, 23, 24, 25, 26]),
    ([27, 28], [(3, 2)], [29]),
]


@functools.cache
def tiny_model(attn: str = "sdpa") -> nn.Module:
    """One model per attention implementation for the whole session (tests detach their pruners)."""
    return build_tiny_gemma4(attn_implementation=attn)


def grids(b: int) -> list[tuple[int, int]]:
    return PROMPTS[b][1]


def tokens(b: int) -> list[int]:
    """Image tokens of each image of sample b."""
    return [rows * cols for rows, cols in grids(b)]


def pad_patches(parts: list[dict]) -> dict:
    """Images of several samples in one batch, padded to the longest (as the image processor pads them)."""
    longest = max(part["pixel_values"].shape[1] for part in parts)
    values, positions = [], []
    for part in parts:
        missing = longest - part["pixel_values"].shape[1]
        values.append(nn.functional.pad(part["pixel_values"], (0, 0, 0, missing)))
        positions.append(nn.functional.pad(part["image_position_ids"], (0, 0, 0, missing), value=-1))
    return {"pixel_values": torch.cat(values), "image_position_ids": torch.cat(positions)}


def sample_inputs(b: int) -> dict:
    prefix, image_grids, suffix = PROMPTS[b]
    ids = torch.tensor([gemma4_prompt(prefix, tokens(b), suffix)])
    return {
        "input_ids": ids,
        **gemma4_pixels(image_grids, b),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def batch_inputs() -> dict:
    """The samples left-padded into one batch, as the processor gives them (pad id 0)."""
    samples = [sample_inputs(b) for b in range(len(PROMPTS))]
    length = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for b, sample in enumerate(samples):
        n = sample["input_ids"].shape[1]
        ids[b, length - n :] = sample["input_ids"][0]
        mask[b, length - n :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        **pad_patches(samples),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def image_positions(input_ids: torch.Tensor, b: int) -> list[torch.Tensor]:
    """Sequence positions of each image's tokens in a one-sample prompt of sample b."""
    positions = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten()
    return list(positions.split(tokens(b)))


def reference_kept(
    eager: nn.Module,
    inputs: dict,
    b: int,
    layer: int,
    keep: int,
    weight: Callable[[int, int, int, int], float],
) -> list[list[int]]:
    """FastV's choice for one sample: layer K-1's eager attention of the last token, mean over heads, times
    the prior at each token's (row, col) of its own image grid, the top `keep` of each image (earlier token
    first on ties): sorted raster indices."""
    assert eager.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    last_row = out.attentions[layer - 1][0, :, -1, :].mean(dim=0).double()  # (L,)
    kept = []
    for positions, (rows, cols) in zip(image_positions(inputs["input_ids"], b), grids(b), strict=True):
        scores = [
            last_row[p].item() * weight(i // cols, i % cols, rows, cols) for i, p in enumerate(positions)
        ]
        ranking = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        kept.append(sorted(ranking[:keep]))
    return kept


def kept_positions(b: int, inputs: dict, kept_raster: list[list[int]]) -> torch.Tensor:
    """Sequence positions that survive: every text token and the kept image tokens."""
    dropped = set()
    for positions, raster in zip(image_positions(inputs["input_ids"], b), kept_raster, strict=True):
        dropped |= set(positions.tolist()) - {int(positions[r]) for r in raster}
    return torch.tensor([i for i in range(inputs["input_ids"].shape[1]) if i not in dropped])


def hand_mask(token_types: torch.Tensor, sliding: int | None, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, L, L) additive mask of one sample written out: query q may see key k if k <= q; in a sliding
    layer (window `sliding`) also if both are tokens of the same image (a run of image tokens), and only
    if k > q - window."""
    q = torch.arange(token_types.shape[1])[:, None]
    k = torch.arange(token_types.shape[1])[None, :]
    allowed = k <= q
    if sliding is not None:
        is_image = token_types[0] == 1  # (L,)
        start = is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]])
        block = torch.where(is_image, torch.cumsum(start.long(), 0), 0)  # 0 = text, i >= 1: the i-th image
        allowed = (allowed | ((block[:, None] == block[None, :]) & (block[:, None] > 0))) & (k > q - sliding)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def reference_pruned_logits(model: nn.Module, inputs: dict, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose tokens outside `kept` are removed from decoder layer
    `layer` on, each kept token keeping its RoPE position and its per-layer inputs; masks by hand."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1
    base, language_model = model.model, model.model.language_model
    config = language_model.config
    token_types = inputs.get("mm_token_type_ids", torch.zeros_like(input_ids))
    is_image = input_ids == IMAGE_TOKEN
    with torch.no_grad():
        # The model embeds every multimodal placeholder as <pad> (a random model may generate one).
        placeholder = torch.isin(input_ids, torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN]))
        text_ids = input_ids.masked_fill(placeholder, config.pad_token_id)
        hidden = base.get_input_embeddings()(text_ids)
        per_layer = language_model.get_per_layer_inputs(text_ids, hidden)  # (1, L, layers, D_ple)
        features = base.get_image_features(inputs["pixel_values"], inputs["image_position_ids"]).pooler_output
        features = torch.cat(list(features)).to(hidden.dtype)
        hidden = hidden.masked_scatter(is_image[..., None], features)
        per_layer = language_model.project_per_layer_inputs(hidden, per_layer)
        positions = torch.arange(input_ids.shape[1])[None]
        shared: dict = {}  # keys / values the storing layers leave for the KV-shared ones
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden, positions, token_types = hidden[:, kept], positions[:, kept], token_types[:, kept]
                per_layer = per_layer[:, kept]
            kind = config.layer_types[index]
            window = config.sliding_window if kind == "sliding_attention" else None
            hidden = decoder_layer(
                hidden,
                per_layer[:, :, index],
                shared_kv_states=shared,
                attention_mask=hand_mask(token_types, window, hidden.dtype),
                position_embeddings=language_model.rotary_emb(hidden, positions, kind),
                position_ids=positions,
            )
        return model.lm_head(language_model.norm(hidden))


def append_token(inputs: dict, token: int) -> dict:
    grown = dict(inputs)
    grown["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    grown["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], dim=1
    )
    return grown


def until_eos(tokens: torch.Tensor | list[int]) -> list[int]:
    """Generated tokens up to and including the first end of turn (a batch pads after it)."""
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return tokens[: tokens.index(EOS_TOKEN) + 1] if EOS_TOKEN in tokens else tokens
