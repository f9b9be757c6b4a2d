"""Gemma 3 (`Gemma3ForConditionalGeneration`): a fixed square grid of image tokens per image, in raster order.

Where the image tokens are: every `<image_soft_token>` (`config.image_token_id`) of `input_ids`; the
processor writes `<start_of_image>`, `mm_tokens_per_image` (256) image tokens and `<end_of_image>` per image
(the two markers stay as text). Pan & scan crops, when the processor makes them, are more images of the same
prompt, each with its own markers and 256 tokens.

Where each sits: the projector average-pools the SigLIP patch grid (64 x 64 at 896 px / 14) to a
sqrt(mm_tokens_per_image)-sided grid (16 x 16), flattened in raster order, so token i of an image is at
(i // 16, i % 16).

What the language model does differently (handled by the engine, `pore.compat.causal_mask`): it interleaves
sliding-window layers (a window of `sliding_window` tokens, 5 of every 6 layers) with global ones, each
kind with its own RoPE base; and, when the model is called with `token_type_ids` (as the processor returns
them), the tokens of one image attend to each other both ways. The engine rebuilds both kinds of mask for
the pruned sequence, with the bidirectional block of each image over its kept tokens (`bidirectional_blocks`).

The SigLIP tower has no [CLS] token and each language-model token pools several patches: requests of the
vision tower (FasterVLM's [CLS] attention) are not served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pore.adapters.base import ADAPTERS, ModelAdapter, VisualLayout, visual_slots


def image_runs(is_image: torch.Tensor) -> torch.Tensor:
    """(B, L) long: the index of the run of consecutive image tokens each position belongs to (-1 for the
    others), counted per sample: Gemma 3's rule for which image tokens form one bidirectional block."""
    previous = nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous  # (B, L) first token of each run
    run = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, run, torch.full_like(run, -1))


@ADAPTERS.register("gemma3")
class Gemma3Adapter(ModelAdapter):
    """Gemma 3 (`google/gemma-3-{4b,12b,27b}-it`)."""

    name = "gemma3"
    classes = ("Gemma3ForConditionalGeneration", "Gemma3Model")
    model_types = ("gemma3",)

    @classmethod
    def fixed_image_tokens(cls, config: Any) -> int | None:
        return int(config.mm_tokens_per_image)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        tokens = int(model.config.mm_tokens_per_image)
        self.side = math.isqrt(tokens)
        if self.side * self.side != tokens:
            raise ValueError(f"mm_tokens_per_image must be a square number of tokens, not {tokens}")

    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        seq_index, slot, valid, counts = visual_slots(self.visual_token_mask(input_ids))  # (B, N) each
        per_image = self.side * self.side
        if bool((counts % per_image != 0).any()):
            raise ValueError(
                f"each image must give {per_image} image tokens (a {self.side} x {self.side} grid), but the "
                f"prompts hold {counts.tolist()}; build prompts with the model's own processor"
            )
        within = slot % per_image  # (B, N) raster index in the image's grid
        side = torch.full_like(seq_index, self.side)
        zeros = torch.zeros_like(seq_index)
        return VisualLayout(
            seq_index=seq_index,
            image_index=torch.where(valid, slot // per_image, zeros),
            row=torch.where(valid, within // self.side, zeros),
            col=torch.where(valid, within % self.side, zeros),
            grid_h=side,
            grid_w=side,
            valid=valid,
            prunable=valid.clone(),
        )

    def bidirectional_blocks(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor | None:
        """The model lets image tokens attend both ways only when it is called with `token_type_ids` (1 =
        image token); each run of them is one block, as in the model's own mask."""
        token_types = (image_inputs or {}).get("token_type_ids")
        if token_types is None:
            return None
        return image_runs(token_types.to(input_ids.device) == 1)
