"""The model families the engine's contract tests run over (tests/test_contract.py): one entry each.

An entry says how to build the family's tiny model (once per session and attention implementation: tests
never mutate it, and a detached pruner leaves it as it was), how to make its padded batch (samples with
different prompt lengths, numbers of images and, where the family allows it, image sizes) and each sample
alone, and its independent references (the kept set from eager attention weights, the pruned forward with
the dropped tokens removed by plain indexing). A new family is one more entry in `FAMILIES`; the contract
test checks that every registered adapter has one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gemma3_reference
import gemma4_reference
import internvl_reference
import next_reference
import onevision_reference
import qwen3_reference
import qwen_reference
import reference
from conftest import TOKENS_PER_IMAGE, build_tiny_llava, left_pad, make_prompt, pixels

Inputs = dict[str, Any]
# The prior's weight of a token from its grid position: weight(row, col, grid_h, grid_w).
Weight = Callable[[int, int, int, int], float]


@dataclass(frozen=True)
class Family:
    """One model family as the contract tests see it; `b` indexes the samples of `batch()`."""

    name: str  # the pytest id
    adapter: str | None  # the adapter name handed to the Pruner (None: found from the model)
    model: Callable[[str], nn.Module]  # attention implementation -> the (cached) tiny model
    batch: Callable[[], Inputs]  # the padded batch, as the processor gives it (generate()'s inputs)
    sample: Callable[[int], Inputs]  # sample b alone (unpadded), with the pixels it has in the batch
    images: list[int]  # images of each sample
    prunable: Callable[[int], list[int]]  # sample b: prunable tokens of each image
    fixed: Callable[[int], int]  # sample b: visual tokens that are never pruned (LLaVA-NeXT newlines)
    # (eager model, b, layer K, keep, prior weight) -> per image of sample b, the sorted kept indices
    reference_kept: Callable[[nn.Module, int, int, int, Weight], list[list[int]]]
    # (b, the sample's inputs, possibly grown, its kept raster) -> the sequence positions that survive
    kept_positions: Callable[[int, Inputs, list[list[int]]], torch.Tensor]
    # (model, one sample's inputs, layer K, kept positions) -> logits of the by-hand pruned forward
    reference_logits: Callable[[nn.Module, Inputs, int, torch.Tensor], torch.Tensor]
    grow: Callable[[Inputs, int], Inputs]  # the sample's inputs with one more generated token
    keep: int  # a per-image budget every image of the family can give
    answer: Callable[[Any], list[int]] = lambda tokens: list(map(int, tokens))  # the tokens before the end
    # Whether plain forwards of the padded batch need the position ids generate() would compute (LLaVA's
    # forward counts positions from the padding otherwise); Qwen computes its M-RoPE positions itself.
    forward_positions: bool = True
    batch_atol: float = 1e-5  # logits of a sample in the batch vs alone
    compact: bool = True  # strategy.positions=compact is supported (1-D RoPE)
    vision_cls: bool = True  # the vision tower has a [CLS] token (FasterVLM)
    # sample b -> its images' (height, width), for families whose generate() needs `set_image_sizes`
    generate_sizes: Callable[[int | None], list] | None = None
    sizes: Callable[[int | None], list] | None = None  # the same, for vision requests (all families)
    skip: dict[str, str] = field(default_factory=dict)  # method cases of the contract that do not apply: why


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions as generate() computes them: counting real tokens only."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------- LLaVA-1.5

LLAVA_PROMPTS = [  # (prefix, images, suffix)
    ([1, 5, 6], 1, [7, 8, 9, 10]),
    ([1, 11], 2, [12, 13, 14, 15, 16, 17]),
    ([1], 1, [18, 19]),
]


@functools.cache
def llava_model(attn: str = "sdpa") -> nn.Module:
    return build_tiny_llava(attn)


def llava_sample(b: int) -> Inputs:
    prefix, images, suffix = LLAVA_PROMPTS[b]
    return {
        "input_ids": torch.tensor([make_prompt(prefix, images, suffix)]),
        "pixel_values": pixels(images, b),
    }


def llava_batch() -> Inputs:
    input_ids, mask = left_pad([make_prompt(*prompt) for prompt in LLAVA_PROMPTS])
    pixel_values = torch.cat([pixels(images, b) for b, (_, images, _) in enumerate(LLAVA_PROMPTS)])
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}


def llava_reference_kept(eager: nn.Module, b: int, layer: int, keep: int, weight: Weight) -> list[list[int]]:
    inputs = llava_sample(b)
    return reference.reference_kept(eager, inputs["input_ids"], inputs["pixel_values"], layer, keep, weight)


LLAVA = Family(
    name="llava",
    adapter=None,
    model=llava_model,
    batch=llava_batch,
    sample=llava_sample,
    images=[images for _, images, _ in LLAVA_PROMPTS],
    prunable=lambda b: [TOKENS_PER_IMAGE] * LLAVA_PROMPTS[b][1],
    fixed=lambda b: 0,
    reference_kept=llava_reference_kept,
    kept_positions=lambda b, inputs, raster: reference.kept_positions_from_raster(
        inputs["input_ids"], raster
    ),
    reference_logits=lambda model, inputs, layer, kept: reference.reference_pruned_logits(
        model, inputs["input_ids"], inputs["pixel_values"], layer, kept
    ),
    grow=lambda inputs, token: {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1),
    },
    keep=7,
)

# ---------------------------------------------------------------------------------------------- LLaVA-NeXT

# Every worked geometry of next_reference: base + tiles of different shapes, one sample with two images.
NEXT_SIZES: list[list[tuple[int, int]]] = [[(20, 40), (48, 30)], [(30, 45)], [(40, 40)]]


@functools.cache
def next_model(attn: str = "sdpa") -> nn.Module:
    return next_reference.build_model(attn)


@functools.cache
def next_batch() -> Inputs:
    return next_reference.prompt_inputs(NEXT_SIZES)


def next_sample(b: int) -> Inputs:
    before = sum(len(sizes) for sizes in NEXT_SIZES[:b])
    return next_reference.sample_inputs(dict(next_batch()), b, before, len(NEXT_SIZES[b]))


def next_sizes(b: int | None) -> list:
    return NEXT_SIZES if b is None else [NEXT_SIZES[b]]


# In the tile frame every tile's tokens share the high-resolution grid's part and repeat (row, col) 0..S-1,
# so pooling's windows of that grid span the tiles: average pooling mixes tokens of different tiles even when
# it keeps them all (a limitation of `pool` in this frame, not of the engine).
POOL_TILES = "average pooling's windows span tiles in the tile frame"


def next_family(frame: str) -> Family:
    def reference_kept(eager: nn.Module, b: int, layer: int, keep: int, weight: Weight) -> list[list[int]]:
        sizes = NEXT_SIZES[b]
        return next_reference.reference_kept(eager, next_sample(b), sizes, layer, keep, weight, frame)

    def grow(inputs: Inputs, token: int) -> Inputs:
        sequence = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
        return {**inputs, "input_ids": sequence, "attention_mask": torch.ones_like(sequence)}

    return Family(
        name="llava_next" if frame == "image" else "llava_next_tile",
        adapter="llava_next" if frame == "image" else "llava_next_tile",
        model=next_model,
        batch=lambda: dict(next_batch()),
        sample=next_sample,
        images=[len(sizes) for sizes in NEXT_SIZES],
        prunable=lambda b: [len(next_reference.prunable_tokens(size)) for size in NEXT_SIZES[b]],
        fixed=lambda b: sum(
            t.part == "newline" for size in NEXT_SIZES[b] for t in next_reference.expected_tokens(size)
        ),
        reference_kept=reference_kept,
        kept_positions=lambda b, inputs, raster: next_reference.kept_positions(
            inputs["input_ids"], NEXT_SIZES[b], raster
        ),
        reference_logits=next_reference.reference_pruned_logits,
        grow=grow,
        keep=5,
        # In transformers >= 5.23 generate() hands the forward pre-encoded images without their sizes: the
        # whole-image frame reads the layout off the features, the tile frame needs the sizes (as the pipeline
        # passes them).
        generate_sizes=next_sizes if frame == "tile" else None,
        sizes=next_sizes,
        skip={} if frame == "image" else {"pool_average": POOL_TILES},
    )


# ---------------------------------------------------------------------------------------------- OneVision

# A lone 2:1 image (4 x 8 high-resolution grid), a sample of two images (base views only, one newline each),
# and a square image whose 8 x 8 grid is shrunk to 5 x 5 (anyres_max_2).
ONEVISION_SIZES: list[list[tuple[int, int]]] = [[(20, 40)], [(30, 30), (48, 30)], [(40, 40)]]


@functools.cache
def onevision_model(attn: str = "sdpa") -> nn.Module:
    return onevision_reference.build_model(attn)


@functools.cache
def onevision_batch() -> Inputs:
    return onevision_reference.prompt_inputs(ONEVISION_SIZES)


def onevision_sample(b: int) -> Inputs:
    before = sum(len(sizes) for sizes in ONEVISION_SIZES[:b])
    return onevision_reference.sample_inputs(dict(onevision_batch()), b, before, len(ONEVISION_SIZES[b]))


def onevision_grow(inputs: Inputs, token: int) -> Inputs:
    sequence = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
    return {**inputs, "input_ids": sequence, "attention_mask": torch.ones_like(sequence)}


ONEVISION = Family(
    name="llava_onevision",
    adapter=None,
    model=onevision_model,
    batch=lambda: dict(onevision_batch()),
    sample=onevision_sample,
    images=[len(sizes) for sizes in ONEVISION_SIZES],
    prunable=lambda b: onevision_reference.prunable_counts(ONEVISION_SIZES[b]),
    fixed=lambda b: onevision_reference.newline_count(ONEVISION_SIZES[b]),
    reference_kept=lambda eager, b, layer, keep, weight: onevision_reference.reference_kept(
        eager, onevision_sample(b), ONEVISION_SIZES[b], layer, keep, weight
    ),
    kept_positions=lambda b, inputs, raster: onevision_reference.kept_positions(
        inputs["input_ids"], ONEVISION_SIZES[b], raster
    ),
    reference_logits=onevision_reference.reference_pruned_logits,
    grow=onevision_grow,
    keep=5,
    vision_cls=False,  # SigLIP: FasterVLM is refused (tests/test_adapter_llava_onevision.py)
)

# ---------------------------------------------------------------------------------------------- Qwen2-VL


def qwen_weights(weight: Weight) -> qwen_reference.Weights:
    """The prior as qwen_reference takes it: weights of (row, raster index, rows, tokens) tensors."""

    def weights(row: torch.Tensor, raster: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
        cols = tokens // rows
        values = [weight(int(r), int(i) % cols, rows, cols) for r, i in zip(row, raster, strict=True)]
        return torch.tensor(values, dtype=torch.float64)

    return weights


def qwen_family(name: str, adapter: str | None = None) -> Family:
    samples = qwen_reference.SAMPLES

    def reference_kept(eager: nn.Module, b: int, layer: int, keep: int, weight: Weight) -> list[list[int]]:
        inputs = qwen_reference.sample_inputs(name, b)
        return qwen_reference.reference_kept_raster(eager, inputs, layer, keep, qwen_weights(weight))

    def prunable(b: int) -> list[int]:
        return [
            (h // qwen_reference.PIXELS_PER_TOKEN) * (w // qwen_reference.PIXELS_PER_TOKEN)
            for h, w in samples[b][1]
        ]

    return Family(
        name=adapter or name,
        adapter=adapter,
        model=lambda attn="sdpa": qwen_reference.tiny_model(name, attn),
        batch=lambda: qwen_reference.make_inputs(name, samples),
        sample=lambda b: qwen_reference.sample_inputs(name, b),
        images=[len(sizes) for _, sizes in samples],
        prunable=prunable,
        fixed=lambda b: 0,
        reference_kept=reference_kept,
        kept_positions=lambda b, inputs, raster: qwen_reference.kept_positions(
            inputs, qwen_reference.tiny_model(name).config.image_token_id, raster
        ),
        reference_logits=qwen_reference.reference_pruned_logits,
        grow=qwen_reference.append_token,
        keep=3,
        answer=qwen_reference.until_eos,  # generate() stops at <|im_end|>
        forward_positions=False,
        # The vision tower runs all images of a batch as one sequence: its fp32 sums differ in the last bits.
        batch_atol=1e-4,
        compact=False,  # 3-D M-RoPE positions are not renumbered
        vision_cls=False,
    )


# ---------------------------------------------------------------------------------------------- Qwen3-VL


def qwen3_family(name: str) -> Family:
    """Qwen3-VL (dense) or Qwen3-VL-MoE: Qwen2-VL's layout and M-RoPE, plus DeepStack features that the
    by-hand reference carries for the kept tokens only."""

    def reference_kept(eager: nn.Module, b: int, layer: int, keep: int, weight: Weight) -> list[list[int]]:
        inputs = qwen3_reference.sample_inputs(b)
        return qwen_reference.reference_kept_raster(eager, inputs, layer, keep, qwen_weights(weight))

    return Family(
        name=name,
        adapter=None,
        model=lambda attn="sdpa": qwen3_reference.tiny_model(name, attn),
        batch=qwen3_reference.make_inputs,
        sample=qwen3_reference.sample_inputs,
        images=[len(sizes) for _, sizes in qwen3_reference.SAMPLES],
        prunable=qwen3_reference.prunable,
        fixed=lambda b: 0,
        reference_kept=reference_kept,
        kept_positions=lambda b, inputs, raster: qwen_reference.kept_positions(
            inputs, qwen3_reference.tiny_model(name).config.image_token_id, raster
        ),
        reference_logits=qwen3_reference.reference_pruned_logits,
        grow=qwen_reference.append_token,
        keep=3,
        answer=qwen_reference.until_eos,  # generate() stops at <|im_end|>
        forward_positions=False,
        # The vision tower runs all images of a batch as one sequence: its fp32 sums differ in the last bits.
        batch_atol=1e-4,
        compact=False,  # 3-D M-RoPE positions are not renumbered
        vision_cls=False,
    )


# ---------------------------------------------------------------------------------------------- InternVL3


def internvl_reference_kept(
    eager: nn.Module, b: int, layer: int, keep: int, weight: Weight
) -> list[list[int]]:
    return internvl_reference.reference_kept(eager, internvl_reference.sample_inputs(b), layer, keep, weight)


INTERNVL = Family(
    name="internvl",
    adapter=None,
    model=internvl_reference.tiny_model,
    batch=internvl_reference.make_inputs,
    sample=internvl_reference.sample_inputs,
    images=[len(sizes) for _, sizes in internvl_reference.SAMPLES],
    prunable=internvl_reference.prunable,
    fixed=lambda b: 0,
    reference_kept=internvl_reference_kept,
    kept_positions=lambda b, inputs, raster: internvl_reference.kept_positions(inputs, raster),
    reference_logits=internvl_reference.reference_pruned_logits,
    grow=internvl_reference.append_token,
    keep=5,
    answer=internvl_reference.until_eos,  # generate() stops at <|im_end|>
    # The vision tower runs all views of a batch together: its fp32 sums differ in the last bits.
    batch_atol=1e-4,
    vision_cls=False,  # each token merges 2 x 2 patches (pixel shuffle): no [CLS] row per token
)


# ---------------------------------------------------------------------------------------------- Gemma 3

GEMMA3 = Family(
    name="gemma3",
    adapter=None,
    model=gemma3_reference.tiny_model,
    batch=gemma3_reference.batch_inputs,
    sample=gemma3_reference.sample_inputs,
    images=[images for _, images, _ in gemma3_reference.PROMPTS],
    prunable=lambda b: [gemma3_reference.TOKENS] * gemma3_reference.PROMPTS[b][1],
    fixed=lambda b: 0,
    reference_kept=lambda eager, b, layer, keep, weight: gemma3_reference.reference_kept(
        eager, gemma3_reference.sample_inputs(b), layer, keep, weight
    ),
    kept_positions=lambda b, inputs, raster: gemma3_reference.kept_positions(inputs, raster),
    reference_logits=gemma3_reference.reference_pruned_logits,
    grow=gemma3_reference.append_token,
    keep=3,
    answer=gemma3_reference.until_eos,
    vision_cls=False,  # SigLIP: no [CLS]
)


# ---------------------------------------------------------------------------------------------- Gemma 4

GEMMA4 = Family(
    name="gemma4",
    adapter=None,
    model=gemma4_reference.tiny_model,
    batch=gemma4_reference.batch_inputs,
    sample=gemma4_reference.sample_inputs,
    images=[len(grids) for _, grids, _ in gemma4_reference.PROMPTS],
    prunable=gemma4_reference.tokens,  # variable resolution: each image its own grid
    fixed=lambda b: 0,
    reference_kept=lambda eager, b, layer, keep, weight: gemma4_reference.reference_kept(
        eager, gemma4_reference.sample_inputs(b), b, layer, keep, weight
    ),
    kept_positions=gemma4_reference.kept_positions,
    reference_logits=gemma4_reference.reference_pruned_logits,
    grow=gemma4_reference.append_token,
    keep=3,
    answer=gemma4_reference.until_eos,
    # The vision tower pads each batch's images to the largest: its fp32 sums differ in the last bits.
    batch_atol=1e-4,
    vision_cls=False,  # no [CLS]; each token pools k x k patches
)


def remembered(family: Family) -> Family:
    """The family with its kept-set reference computed once per (model, sample, layer, keep, prior): the
    reference runs the eager model, whatever attention implementation the test runs the engine with."""
    return dataclasses.replace(family, reference_kept=functools.cache(family.reference_kept))


FAMILIES: dict[str, Family] = {
    family.name: remembered(family)
    for family in (
        LLAVA,
        next_family("image"),
        next_family("tile"),
        ONEVISION,
        # One budget per video frame: on these image-only samples it must behave exactly as llava_onevision.
        dataclasses.replace(ONEVISION, name="llava_onevision_frames", adapter="llava_onevision_frames"),
        qwen_family("qwen2_vl"),
        qwen_family("qwen2_5_vl"),
        qwen3_family("qwen3_vl"),
        qwen3_family("qwen3_vl_moe"),
        INTERNVL,
        # One budget per video frame: on these image-only samples it must behave exactly as qwen2_vl.
        qwen_family("qwen2_vl", adapter="qwen2_vl_frames"),
        dataclasses.replace(qwen3_family("qwen3_vl"), name="qwen3_vl_frames", adapter="qwen3_vl_frames"),
        GEMMA3,
        GEMMA4,
    )
}


# ---------------------------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class PriorCase:
    """A strategy whose prior the references write out independently as `weight`."""

    strategy: str
    settings: dict  # build_strategy's prior settings
    weight: Weight


def _row(row: int, grid_h: int) -> float:
    return row / max(grid_h - 1, 1)


def _index(row: int, col: int, grid_h: int, grid_w: int) -> float:
    return (row * grid_w + col) / max(grid_h * grid_w - 1, 1)


PRIOR_CASES: dict[str, PriorCase] = {
    "fastv": PriorCase("fastv", {}, lambda r, c, h, w: 1.0),
    "pore_linear": PriorCase("pore_linear", {"alpha": 0.95}, lambda r, c, h, w: 1.0 - 0.95 * _row(r, h)),
    "pore_exponential": PriorCase(
        "pore_exponential", {"sigma": 2.0}, lambda r, c, h, w: math.exp(-2.0 * _row(r, h))
    ),
    "pore_exponential_index": PriorCase(
        "pore_exponential",
        {"sigma": 1.5, "position": "index"},
        lambda r, c, h, w: math.exp(-1.5 * _index(r, c, h, w)),
    ),
}
