"""InternVL3 (`InternVLForConditionalGeneration`, the `OpenGVLab/InternVL3-*-hf` checkpoints): tiles plus a
thumbnail, 256 tokens per tile after pixel shuffle.

The processor (GOT-OCR2's image processor) cuts each image into the grid of 448 px tiles closest to its
aspect ratio (1 to `max_patches` = 12 tiles) and, when there are several, appends a thumbnail of the whole
image resized to one tile: n views per image (n = 1, or tiles + 1). The vision tower (InternViT, patch 14)
encodes each view as 32 x 32 patches plus a [CLS] token; the model drops the [CLS], pixel-shuffles 2 x 2
neighbouring patches into one token (`InternVLModel.pixel_shuffle`: a 16 x 16 grid in raster order) and
projects them. The prompt holds, per image, `<img>` + 256 x n `<IMG_CONTEXT>` + `</img>`, the views in the
processor's order (tiles in raster order of the tile grid, the thumbnail last).

Layout: the image tokens are the `<IMG_CONTEXT>` placeholders (`config.image_token_id`); each contiguous run
of them is one image (`<img>` / `</img>` separate consecutive images), whose k-th token lies in view k // 256
(`VisualLayout.part`: 0 .. n - 1, the thumbnail last) at (row, col) = divmod(k % 256, 16) of that view's
16 x 16 grid. The frame of (row, col) is the view (a tile, or the thumbnail, which is the whole image): the
model never sees the tile grid (the processor chose it from the image size), so a whole-image frame across
tiles is not read off the prompt. `keep` / `ratio` apply per image to all its views together (one top-k
over the tiles and the thumbnail, as for LLaVA-NeXT's base and high-resolution grids); `pool` pools each
view on its own.

RoPE is 1-D (a Qwen2 decoder): compact positions work. The vision tower has a [CLS] token, but each
language-model token merges 2 x 2 patches, so methods that read the vision tower (FasterVLM's [CLS]
attention) are refused; image and text embeddings and decoder requests work. Video tokens (`<video>`
expanded to per-frame `<img>` runs of `<IMG_CONTEXT>`) are the same placeholders, so a video's frames are read
as images of one view each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pore.adapters.base import ADAPTERS, ModelAdapter, VisualLayout, visual_slots


def tile_grid_side(config: Any) -> int:
    """Tokens per side of one view after pixel shuffle (16 for 448 px tiles of 14 px patches)."""
    vision = config.vision_config
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    side = (size // patch) * config.downsample_ratio
    if side != int(side):
        raise ValueError(
            f"pixel shuffle of {size // patch} patches by {config.downsample_ratio} is not whole"
        )
    return int(side)


@ADAPTERS.register("internvl")
class InternVLAdapter(ModelAdapter):
    """InternVL3 (`OpenGVLab/InternVL3-{1B,2B,8B,14B}-hf`)."""

    name = "internvl"
    classes = ("InternVLForConditionalGeneration", "InternVLModel")
    model_types = ("internvl",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise ValueError(
                f"unsupported vision_feature_select_strategy {config.vision_feature_select_strategy!r}: "
                "the InternVL adapter needs 'default' (the [CLS] token dropped before pixel shuffle)"
            )
        self.image_token_id: int = config.image_token_id
        self.side = tile_grid_side(config)
        self.tokens_per_view = self.side * self.side

    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        is_visual = self.visual_token_mask(input_ids)  # (B, L)
        seq_index, slot, valid, counts = visual_slots(is_visual)  # (B, N) each; counts (B,)
        # An image starts at an image token whose left neighbour is not one (<img> precedes every image).
        before = torch.nn.functional.pad(is_visual[:, :-1], (1, 0), value=False)  # (B, L)
        starts = is_visual & ~before  # (B, L)
        image_of_position = starts.long().cumsum(dim=1) - 1  # (B, L)
        image_index = torch.where(valid, image_of_position.gather(1, seq_index), 0)  # (B, N)
        starts_slot = starts.gather(1, seq_index) & valid  # (B, N)
        first_slot = torch.where(starts_slot, slot, 0).cummax(dim=1).values  # (B, N)
        within = slot - first_slot  # (B, N): the token's rank inside its image
        self._check_whole_views(image_index, within, valid, counts)
        view, in_view = within // self.tokens_per_view, within % self.tokens_per_view
        zero = torch.zeros_like(seq_index)
        return VisualLayout(
            seq_index=seq_index,
            image_index=image_index,
            row=torch.where(valid, in_view // self.side, zero),
            col=torch.where(valid, in_view % self.side, zero),
            grid_h=torch.full_like(seq_index, self.side),
            grid_w=torch.full_like(seq_index, self.side),
            valid=valid,
            prunable=valid.clone(),
            part=torch.where(valid, view, zero),
        )

    def _check_whole_views(
        self, image_index: torch.Tensor, within: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """Every image's run of image tokens must be a whole number of views."""
        # The last token of an image is the one whose next slot starts another image (or is the last).
        following = torch.nn.functional.pad(image_index[:, 1:], (0, 1), value=-1)  # (B, N)
        following_valid = torch.nn.functional.pad(valid[:, 1:], (0, 1), value=False)
        last = valid & (~following_valid | (following != image_index))  # (B, N)
        sizes = within[last] + 1
        if bool((sizes % self.tokens_per_view != 0).any()):
            raise ValueError(
                f"each image must give a multiple of {self.tokens_per_view} image tokens (a "
                f"{self.side} x {self.side} grid per tile), but the prompts hold runs of "
                f"{sorted(set(sizes.tolist()))}; build prompts with the model's own processor"
            )

    def views(self, layout: VisualLayout) -> torch.Tensor:
        """(B, N) long: how many views the image of each visual token has (1: a single tile, which is the
        whole image; n > 1: n - 1 tiles and the thumbnail, view n - 1)."""
        per_image = torch.zeros_like(layout.part)
        for image in range(int(layout.images_per_sample.max()) if layout.valid.any() else 0):
            of_image = layout.valid & (layout.image_index == image)  # (B, N)
            count = torch.where(of_image, layout.part + 1, 0).max(dim=1, keepdim=True).values  # (B, 1)
            per_image = torch.where(of_image, count, per_image)
        return per_image
