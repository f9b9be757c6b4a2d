"""Gemma 4 (`Gemma4ForConditionalGeneration`): Gemma 3's adapter for images of variable resolution.

Where the image tokens are: every `<|image|>` (`config.image_token_id`) of `input_ids`; the processor writes
`<|image>`, the image's soft tokens and `<image|>` per image (the two markers stay as text).

Where each sits: the image processor resizes each image, keeping its aspect ratio, to at most
`max_soft_tokens` x k^2 patches (k = `vision_config.pooling_kernel_size`) with sides that are multiples of
k patches, and hands the model each patch's (x, y) (`image_position_ids`, (-1, -1) for padding). The vision
pooler averages each k x k block of patches into one soft token, numbered x // k + (W / k) * (y // k): an
image of H x W patches gives an (H / k) x (W / k) grid of tokens in raster order, its own grid per image.
When generate() encodes the images before the prefill (transformers >= 5.23) it no longer hands the forward
`image_position_ids`; the engine then keeps them from the vision tower's own call (`layout_inputs`).

What the language model does differently from Gemma 3, and how pruning follows it:

- sliding-window and full layers, each kind with its own RoPE; with `use_bidirectional_attention="vision"`
  (and `mm_token_type_ids` in the call, as the processor returns them) the tokens of one image attend to each
  other both ways in the sliding-window layers only (the full layers stay causal): the engine rebuilds the
  blocks over the kept tokens for those layers (`bidirectional_layer_types`);
- per-layer input embeddings (`hidden_size_per_layer_input`): each decoder layer receives its slice of a
  (B, L, layers, D_ple) tensor as its second positional argument; the engine gathers it at the kept tokens
  (`per_token_layer_argument`, `pore.engine.layer_inputs`);
- KV sharing (`num_kv_shared_layers`): the last layers compute no keys / values of their own but read those
  the last earlier layer of their kind stored (`shared_kv_states`). Those stored keys cover the sequence that
  layer ran on, so a cut is exact only if every storing layer runs on the cut sequence: stages may cut at
  layers up to the first storing layer (`facts().last_prunable_layer`); deeper stages are refused before the
  weights load;
- at a prefill with an integer `logits_to_keep` (generate()), the KV-shared layers run on the last tokens
  only; the engine cuts its masks and RoPE to them as the model does.

Audio and video inputs are not pruned (prompts with video tokens are refused); the SigLIP-like tower has no
[CLS] token and each token pools several patches: requests of the vision tower are not served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pore.adapters.base import ADAPTERS, ModelAdapter, ModelFacts, VisualLayout, visual_slots
from pore.adapters.gemma3 import Gemma3Adapter, image_runs


def kv_storing_layers(text_config: Any) -> list[int]:
    """The decoder layers whose keys / values the KV-shared layers read: the last layer of each kind before
    the first shared one (`num_kv_shared_layers` of them at the end); [] without KV sharing."""
    layers, shared = (
        int(text_config.num_hidden_layers),
        int(getattr(text_config, "num_kv_shared_layers", 0) or 0),
    )
    if shared == 0:
        return []
    own = list(text_config.layer_types[: layers - shared])
    return sorted(len(own) - 1 - own[::-1].index(kind) for kind in set(own))


def patch_grids(position_ids: torch.Tensor, kernel: int) -> torch.Tensor:
    """(I, 2) long: the (rows, cols) of soft tokens of each image from its patches' (x, y) positions
    (I, P, 2), (-1, -1) for padding: (H / k, W / k) for an image of H x W patches."""
    real = (position_ids >= 0).all(dim=-1)  # (I, P)
    clamped = torch.where(real[..., None], position_ids, torch.zeros_like(position_ids))
    width = clamped[..., 0].amax(dim=1) + 1  # (I,) patches per row
    height = clamped[..., 1].amax(dim=1) + 1  # (I,)
    return torch.stack([height // kernel, width // kernel], dim=-1)


@ADAPTERS.register("gemma4")
class Gemma4Adapter(Gemma3Adapter):
    """Gemma 4 (`google/gemma-4-{E2B,E4B,26B-A4B,31B}-it`)."""

    name = "gemma4"
    classes = ("Gemma4ForConditionalGeneration", "Gemma4Model")
    model_types = ("gemma4",)
    per_token_layer_argument = (
        1,
        "per_layer_input",
    )  # Gemma4TextDecoderLayer.forward(hidden, per_layer_input)
    bidirectional_layer_types = ("sliding_attention",)

    @classmethod
    def fixed_image_tokens(cls, config: Any) -> int | None:
        return None  # variable resolution: each image has its own grid

    @classmethod
    def facts(cls, config: Any, images_padded: bool | None = None) -> ModelFacts:
        facts = super().facts(config, images_padded)
        storing = kv_storing_layers(config.get_text_config())
        if not storing:
            return facts
        shared = config.get_text_config().num_kv_shared_layers
        reason = (
            f"its last {shared} layers reuse the keys and values that layers {storing} compute, which must "
            f"already run on the pruned sequence"
        )
        return dataclasses.replace(facts, last_prunable_layer=storing[0], prunable_layers_reason=reason)

    def __init__(self, model: nn.Module) -> None:
        ModelAdapter.__init__(self, model)
        text = model.config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise NotImplementedError(
                "Gemma 4 language models with use_bidirectional_attention='all' (no causal mask) are not "
                "supported by the pruner"
            )
        self.kernel = int(model.config.vision_config.pooling_kernel_size)

    def layout_inputs(self) -> tuple[nn.Module, dict[str, str]]:
        return self.multimodal_module().vision_tower, {"pixel_position_ids": "image_position_ids"}

    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        video_id = getattr(self.model.config, "video_token_id", None)
        if video_id is not None and bool((input_ids == video_id).any()):
            raise NotImplementedError(
                "pruning Gemma 4 video tokens is not supported: prompts with images only"
            )
        is_image = self.visual_token_mask(input_ids)  # (B, L)
        seq_index, slot, valid, counts = visual_slots(is_image)  # (B, N) each
        positions = (image_inputs or {}).get("image_position_ids")
        if not bool(valid.any()):  # text only: no grid to read
            zeros = torch.zeros_like(seq_index)
            return VisualLayout(seq_index, zeros, zeros, zeros, zeros, zeros, valid, valid.clone())
        if positions is None:
            raise ValueError(
                "Gemma 4 prompts with image tokens need image_position_ids (each patch's (x, y), as the "
                "Gemma4Processor returns them) to place the tokens in their image grids"
            )
        grids = patch_grids(torch.as_tensor(positions).to(input_ids.device).long(), self.kernel)  # (I, 2)
        sizes = grids[:, 0] * grids[:, 1]  # (I,) tokens per image, the batch's images in order
        if int(sizes.sum()) != int(counts.sum()):
            raise ValueError(
                f"the prompts hold {int(counts.sum())} image tokens but their images give "
                f"{sizes.tolist()} (from image_position_ids); build prompts with the model's own processor"
            )
        # The batch's image tokens in sample order form one stream, image after image (masked_scatter).
        offset = torch.cumsum(counts, dim=0) - counts  # (B,) first stream index of each sample
        stream = torch.where(valid, offset[:, None] + slot, torch.zeros_like(slot))  # (B, N)
        ends = torch.cumsum(sizes, dim=0)  # (I,)
        image = torch.searchsorted(ends, stream, right=True)  # (B, N) image of the batch
        within = stream - (ends - sizes)[image]  # (B, N) raster index in the image's grid
        first = torch.searchsorted(ends, offset, right=True)  # (B,) first image of each sample
        self._check_runs(is_image, seq_index, valid, image)
        grid_h, grid_w = grids[image, 0], grids[image, 1]  # (B, N)
        zeros = torch.zeros_like(seq_index)
        return VisualLayout(
            seq_index=seq_index,
            image_index=torch.where(valid, image - first[:, None], zeros),
            row=torch.where(valid, within // grid_w, zeros),
            col=torch.where(valid, within % grid_w, zeros),
            grid_h=torch.where(valid, grid_h, zeros),
            grid_w=torch.where(valid, grid_w, zeros),
            valid=valid,
            prunable=valid.clone(),
        )

    @staticmethod
    def _check_runs(
        is_image: torch.Tensor, seq_index: torch.Tensor, valid: torch.Tensor, image: torch.Tensor
    ) -> None:
        """Each image's tokens must be one run of consecutive image tokens, one image per run."""
        run = image_runs(is_image).gather(1, seq_index)  # (B, N)
        new_run = run[:, 1:] != run[:, :-1]  # (B, N-1)
        new_image = image[:, 1:] != image[:, :-1]
        if bool(((new_run != new_image) & valid[:, 1:]).any()):
            raise ValueError(
                "each Gemma 4 image must be one run of image tokens of its own grid's size; build prompts "
                "with the model's own processor"
            )

    def bidirectional_blocks(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor | None:
        """As the model builds them: with `use_bidirectional_attention="vision"` and `mm_token_type_ids` in
        the call (1 = image, 2 = video token), each run of such tokens is one block."""
        text = self.model.config.get_text_config()
        token_types = (image_inputs or {}).get("mm_token_type_ids")
        if getattr(text, "use_bidirectional_attention", None) != "vision" or token_types is None:
            return None
        token_types = token_types.to(input_ids.device)
        return image_runs((token_types == 1) | (token_types == 2))
