"""Checks shared by the tests of the selection methods (DivPrune, DART, CDPruner) over tests/families.py:
what the untouched language model receives, where each image token sits, and cached generation against a
by-hand greedy loop that recomputes the pruned sequence from scratch."""

from __future__ import annotations

import torch

from families import Family, positions_from_mask
from pore import Pruner, Strategy


def batch_inputs(family: Family) -> dict:
    """The family's padded batch for a plain forward, with the positions generate() would compute (LLaVA's
    forward counts them from the padding otherwise, and key norms after RoPE depend on them)."""
    inputs = family.batch()
    if family.forward_positions and "attention_mask" in inputs:
        return {**inputs, "position_ids": positions_from_mask(inputs["attention_mask"])}
    return inputs


def language_model_inputs(family: Family, model: torch.nn.Module, b: int) -> torch.Tensor:
    """(L, D) what the untouched language model receives for sample b alone (its input embeddings)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**family.sample(b))
    finally:
        handle.remove()
    return seen["embeds"]


def token_positions(family: Family, b: int, image: int) -> list[int]:
    """The sequence position of each prunable token of `image` in sample b alone, in raster order."""
    inputs = family.sample(b)
    empty: list[list[int]] = [[] for _ in range(family.images[b])]
    base = set(family.kept_positions(b, inputs, empty).tolist())
    positions = []
    for r in range(family.prunable(b)[image]):
        raster = [list(kept) for kept in empty]
        raster[image] = [r]
        (extra,) = set(family.kept_positions(b, inputs, raster).tolist()) - base
        positions.append(extra)
    return positions


def assert_cached_generation_equals_recomputing(
    family: Family, strategy: Strategy, layer: int, new_tokens: int = 5
) -> None:
    """generate() with the KV cache == a greedy loop that recomputes the pruned sequence by hand (the dropped
    tokens removed from layer `layer` on, original positions), for the first two samples."""
    model = family.model("sdpa")
    for b in (0, 1):
        inputs = family.sample(b)
        length = inputs["input_ids"].shape[1]
        with torch.no_grad(), Pruner(model, strategy, family.adapter) as pruner:
            if family.generate_sizes is not None:
                pruner.set_image_sizes(family.generate_sizes(b))
            cached = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, length:]
        prompt_kept = family.kept_positions(b, inputs, pruner.last_record.kept_raster[0])
        sequence, recomputed = inputs, []
        for _ in range(new_tokens):
            total = sequence["input_ids"].shape[1]
            kept = torch.cat([prompt_kept, torch.arange(length, total)])
            token = int(family.reference_logits(model, sequence, layer, kept)[0, -1].argmax())
            recomputed.append(token)
            sequence = family.grow(sequence, token)
        assert family.answer(cached.tolist()) == family.answer(recomputed)
