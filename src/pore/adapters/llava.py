"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one square grid of image tokens per image, in raster order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pore.adapters.base import ADAPTERS, ModelAdapter, VisionEncoder, VisualLayout, visual_slots


def llava_grid_shape(config) -> tuple[int, int]:
    """(H, W) of the LLM's image-token grid, from the vision config (24 x 24 for llava-1.5 at 336 px / 14)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


def clip_vision_encoder(tower: nn.Module, config: Any) -> VisionEncoder:
    """The CLIP encoder of a LLaVA-style model (`vision_tower`, the multimodal `config`).

    hidden_states[j] is the output of encoder layer j - 1 (j = 0: the embeddings), so the features of
    `vision_feature_layer` j come out of layer j - 1, and that layer's attention is the one that shaped them.
    """
    vision_model = getattr(tower, "vision_model", tower)  # (older releases nest the encoder)
    layers = vision_model.encoder.layers
    feature_layer = config.vision_feature_layer
    if isinstance(feature_layer, (list, tuple)):
        feature_layer = feature_layer[-1]
    j = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    if not 1 <= j <= len(layers):
        raise ValueError(f"vision_feature_layer {feature_layer} does not come out of an encoder layer")
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    has_cls = hasattr(vision_model.embeddings, "class_embedding")
    return VisionEncoder(layers, tower.config, j, side * side + int(has_cls), has_cls)


@ADAPTERS.register("llava")
class LlavaAdapter(ModelAdapter):
    name = "llava"
    # The family can encode pad-to-square images (the grid then covers the padded square), as LLaVA-1.5's own
    # code does (expand2square). Whether a run's images were padded is the preprocessing's business: the
    # llava-hf processor centre-crops (CLIPImageProcessor, `do_pad` false), protocol=llava pads; the pipeline
    # passes that to the Pruner as `images_padded`.
    pads_to_square = True
    vision_requests = True  # CLIP: one [CLS] row per patch, one patch per visual token

    classes = ("LlavaForConditionalGeneration", "LlavaModel")
    model_types = ("llava",)

    @classmethod
    def fixed_image_tokens(cls, config: Any) -> int | None:
        grid_h, grid_w = llava_grid_shape(
            config
        )  # one fixed grid per image; a [CLS] kept in front is not prunable
        return grid_h * grid_w

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.image_token_id: int = config.image_token_id
        self.grid_h, self.grid_w = llava_grid_shape(config)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
        # "full" keeps the CLS token in front of the patch tokens: one extra token per image, not in the grid.
        self.extra_leading_tokens = 1 if strategy == "full" else 0

    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        seq_index, slot, valid, counts = visual_slots(self.visual_token_mask(input_ids))  # (B, N) each
        tokens_per_image = self.grid_h * self.grid_w + self.extra_leading_tokens
        if bool((counts % tokens_per_image != 0).any()):
            raise ValueError(
                f"each image must give {tokens_per_image} image tokens "
                f"(a {self.grid_h} x {self.grid_w} grid), "
                f"but the prompts hold {counts.tolist()}; build prompts with the model's own processor"
            )
        within = (
            slot % tokens_per_image - self.extra_leading_tokens
        )  # index inside the image's grid; -1 = CLS
        in_grid = valid & (within >= 0)
        within = within.clamp(min=0)
        return VisualLayout(
            seq_index=seq_index,
            image_index=slot // tokens_per_image,
            row=within // self.grid_w,
            col=within % self.grid_w,
            grid_h=torch.full_like(seq_index, self.grid_h),
            grid_w=torch.full_like(seq_index, self.grid_w),
            valid=valid,
            prunable=in_grid,
        )

    # ------------------------------------------------------------------ the vision tower

    def vision_encoder(self) -> VisionEncoder:
        return clip_vision_encoder(self.multimodal_module().vision_tower, self.model.config)

    def vision_token_index(
        self, layout: VisualLayout, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """One view per image, the images of the batch in order (sample 0's first): a grid token's position
        is 1 + its raster index (after the [CLS] position); a `full` [CLS] image token's is the [CLS]."""
        encoder = self.vision_encoder()
        images_per_sample = layout.images_per_sample
        first_image = torch.cumsum(images_per_sample, 0) - images_per_sample  # (B,)
        view = first_image[:, None] + layout.image_index  # (B, N) the image's view in the batch
        patch = int(encoder.has_cls) + layout.raster  # (B, N)
        within = torch.where(layout.prunable, patch, torch.zeros_like(patch))
        return torch.where(layout.valid, view * encoder.positions + within, torch.full_like(view, -1))
