"""Independent references for Gemma 3 (tests/families.py), written against the untouched tiny model.

Nothing here uses the pruning engine or transformers' mask builders: the kept set comes from eager attention
weights (`output_attentions=True`), and the pruned forward runs the decoder layers by hand on the kept
tokens with a mask written out here: causal, OR the bidirectional block of each image's kept tokens, AND
(sliding-window layers) a window of `sliding_window` positions of the shortened sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from pore.testing.tiny_gemma3 import EOS_TOKEN, IMAGE_TOKEN, build_tiny_gemma3, gemma3_prompt

TOKENS = 16  # image tokens per image (a 4 x 4 grid)
SIDE = 4
# (prefix, images, suffix): different prompt lengths and numbers of images, all longer than the window (8).
PROMPTS = [([8, 9, 10], 1, [11, 12, 13, 14]), ([15], 2, [16, 17, 18, 19, 20, 21]), ([22, 23], 1, [24])]


@functools.cache
def tiny_model(attn: str = "sdpa") -> nn.Module:
    """One model per attention implementation for the whole session (tests detach their pruners)."""
    return build_tiny_gemma3(attn_implementation=attn)


def pixels(images: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + seed)
    return torch.randn(images, 3, 32, 32, generator=generator)


def sample_inputs(b: int) -> dict:
    prefix, images, suffix = PROMPTS[b]
    ids = torch.tensor([gemma3_prompt(prefix, images, suffix)])
    return {
        "input_ids": ids,
        "pixel_values": pixels(images, b),
        "token_type_ids": (ids == IMAGE_TOKEN).long(),
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
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def image_positions(input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Sequence positions of each image's tokens in a one-sample prompt (TOKENS consecutive each)."""
    positions = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten()
    return list(positions.split(TOKENS))


def reference_kept(
    eager: nn.Module, inputs: dict, layer: int, keep: int, weight: Callable[[int, int, int, int], float]
) -> list[list[int]]:
    """FastV's choice for one sample: layer K-1's eager attention of the last token, mean over heads, times
    the prior, the top `keep` of each image (earlier token first on ties): sorted raster indices."""
    assert eager.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    last_row = out.attentions[layer - 1][0, :, -1, :].mean(dim=0).double()  # (L,)
    kept = []
    for positions in image_positions(inputs["input_ids"]):
        scores = [
            last_row[p].item() * weight(i // SIDE, i % SIDE, SIDE, SIDE) for i, p in enumerate(positions)
        ]
        ranking = sorted(range(TOKENS), key=lambda i: (-scores[i], i))
        kept.append(sorted(ranking[:keep]))
    return kept


def kept_positions(inputs: dict, kept_raster: list[list[int]]) -> torch.Tensor:
    """Sequence positions that survive: every text token and the kept image tokens."""
    dropped = set()
    for positions, raster in zip(image_positions(inputs["input_ids"]), kept_raster, strict=True):
        dropped |= set(positions.tolist()) - {int(positions[r]) for r in raster}
    return torch.tensor([i for i in range(inputs["input_ids"].shape[1]) if i not in dropped])


def hand_mask(token_types: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, L, L) additive mask of one sample written out: query q may see key k if k <= q, or both are
    image tokens of the same image (a run of image tokens); and, for a window, k > q - window."""
    is_image = token_types[0] == 1  # (L,)
    start = is_image & ~torch.cat([torch.tensor([False]), is_image[:-1]])
    run = torch.cumsum(start.long(), 0)
    block = torch.where(is_image, run, 0)  # 0 = text, i >= 1: the i-th image
    q = torch.arange(len(block))[:, None]
    k = torch.arange(len(block))[None, :]
    allowed = (k <= q) | ((block[:, None] == block[None, :]) & (block[:, None] > 0))
    if window is not None:
        allowed &= k > q - window
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def reference_pruned_logits(model: nn.Module, inputs: dict, layer: int, kept: torch.Tensor) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose tokens outside `kept` are removed from decoder layer
    `layer` on, each kept token keeping its RoPE position; the masks written by hand (`hand_mask`)."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1
    base, language_model = model.model, model.model.language_model
    config = language_model.config
    token_types = inputs.get("token_type_ids", torch.zeros_like(input_ids))
    with torch.no_grad():
        hidden = base.get_input_embeddings()(input_ids)
        features = base.get_image_features(inputs["pixel_values"]).pooler_output.reshape(-1, hidden.shape[-1])
        hidden = hidden.masked_scatter((input_ids == IMAGE_TOKEN)[..., None], features.to(hidden.dtype))
        positions = torch.arange(input_ids.shape[1])[None]
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden, positions, token_types = hidden[:, kept], positions[:, kept], token_types[:, kept]
            kind = config.layer_types[index]
            window = config.sliding_window if kind == "sliding_attention" else None
            hidden = decoder_layer(
                hidden,
                attention_mask=hand_mask(token_types, window, hidden.dtype),
                position_embeddings=language_model.rotary_emb(hidden, positions, kind),
                position_ids=positions,
            )
        return model.lm_head(language_model.norm(hidden))


def append_token(inputs: dict, token: int) -> dict:
    grown = dict(inputs)
    grown["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    grown["token_type_ids"] = torch.cat(
        [inputs["token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], dim=1
    )
    return grown


def until_eos(tokens: torch.Tensor | list[int]) -> list[int]:
    """Generated tokens up to and including the first end of turn (a batch pads after it)."""
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return tokens[: tokens.index(EOS_TOKEN) + 1] if EOS_TOKEN in tokens else tokens
