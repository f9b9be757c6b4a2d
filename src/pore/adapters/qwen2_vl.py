"""Qwen2-VL and Qwen2.5-VL: one dynamic grid of image tokens per image, sized by `image_grid_thw`.

Both families share this adapter (their language models, M-RoPE and prompt layout are the same; they differ
in the vision tower, which the pruner never touches).

Where the image tokens are: every `<|image_pad|>` (`config.image_token_id`) of `input_ids`; the processor
writes one per merged patch, between `<|vision_start|>` and `<|vision_end|>` (those two stay as text).

Where each sits: `image_grid_thw` holds one row (t, h, w) per image, in patches, for the whole batch in order
(the first sample's images first, each sample's in prompt order), which is the order in which the model
scatters the image features into the image tokens. The vision tower merges `spatial_merge_size` x
`spatial_merge_size` patches into one token, so the language model sees a (h / m) x (w / m) grid per frame,
in raster order (the same order `get_rope_index` gives them their (row, col) M-RoPE positions). Images have
t = 1. Should an image have t > 1 frames, its tokens are frame after frame: row and col are counted inside
each frame (so a row prior treats every frame alike) and all frames share one `image_index` (one budget per
image). Images of different sizes give different grids, in one prompt and across a batch.

Video tokens (`<|video_pad|>`, placed by `video_grid_thw` the same way, frame after frame: the vision tower
merges `temporal_patch_size` (2) frames into one temporal patch, so a "frame" here is one temporal patch) are
visual tokens like image tokens: scored and prunable, with `frame` (the layout's `frame` and `part`, so that
pooling pools each frame on its own), and row / col inside the frame. A video is one item of the layout
(`image_index`: the sample's images and videos numbered in prompt order), so the budget (`keep`, `ratio`) is
per video, or per frame with `model.adapter=qwen2_vl_frames` (each frame its own item).

M-RoPE: the language model turns the (3, B, L) position ids into one (cos, sin) pair of shape (B, L, head_dim)
(time / height / width sections already interleaved) and hands every decoder layer that pair plus the 1-D
text positions (B, L) (or None outside `generate`). The engine gathers both along the sequence like any
RoPE model, so kept tokens keep their original 3-D positions. At decoding steps the new tokens' positions
come from the model itself (`generate`'s running position ids, or the cache length of layer 0, which holds
every token, plus the `rope_deltas` kept on the model from the prefill), so pruning never shifts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pore.adapters.base import ADAPTERS, ModelAdapter, VisualLayout, visual_slots

QWEN_VL_CLASSES: tuple[str, ...] = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLModel",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLModel",
)


@ADAPTERS.register("qwen2_vl")
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL (`Qwen/Qwen2-VL-*-Instruct`, `Qwen/Qwen2.5-VL-*-Instruct`)."""

    name = "qwen2_vl"
    multimodal_rope = True

    classes = QWEN_VL_CLASSES
    model_types = ("qwen2_vl", "qwen2_5_vl")

    #: whether every frame of a video is an item of its own (its own budget) instead of the whole video
    budget_per_frame: bool = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.image_token_id: int = config.image_token_id
        self.video_token_id: int = config.video_token_id
        self.merge: int = config.vision_config.spatial_merge_size

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: image and video placeholders (`<|image_pad|>`, `<|video_pad|>`)."""
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        is_visual = self.visual_token_mask(input_ids)  # (B, L)
        seq_index, _, valid, _ = visual_slots(is_visual)  # (B, N) each
        if seq_index.shape[1] == 0:
            empty = torch.zeros_like(seq_index)
            return VisualLayout(seq_index, empty, empty, empty, empty, empty, valid, valid)

        inputs = image_inputs or {}
        position_ids = inputs.get("position_ids")
        is_video = input_ids == self.video_token_id
        grids = {"image_grid_thw": is_visual & ~is_video, "video_grid_thw": is_video}
        if all(inputs.get(key) is not None or not bool(mask.any()) for key, mask in grids.items()):
            # (B, L) maps of each placeholder's item (image or video of its kind), row, col, ... per kind.
            maps = [torch.zeros_like(input_ids, dtype=torch.long) for _ in range(6)]
            for kind, (key, mask) in enumerate(grids.items()):
                if bool(mask.any()):
                    self._scatter_kind(maps, mask, inputs[key], kind)
            item, row, col, grid_h, grid_w, frame = (m.gather(1, seq_index) for m in maps)
            image = self._items_in_sequence_order(item, valid)
        elif position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] in (3, 4):
            # transformers >= 5.23's generate() encodes the images before the prefill and no longer hands
            # image_grid_thw to the forward; the 3-D M-RoPE positions it hands instead hold the same grid.
            image, row, col, grid_h, grid_w, frame = self._place_without_grids(
                input_ids, seq_index, valid, position_ids, inputs
            )
        else:
            raise ValueError(
                "Qwen2-VL prompts with image (video) tokens need image_grid_thw (video_grid_thw), one (t, h, "
                "w) row per image (video), or the model's 3-D position ids to place them; pass the "
                "processor's output to the model unchanged"
            )
        zeros = torch.zeros_like(seq_index)
        frame = torch.where(valid, frame, zeros)
        if self.budget_per_frame:  # every frame of a video its own item (images have one frame)
            image = self._items_in_sequence_order(image * (int(frame.max()) + 1) + frame, valid)
        return VisualLayout(
            seq_index=seq_index,
            image_index=torch.where(valid, image, zeros),
            row=torch.where(valid, row, zeros),
            col=torch.where(valid, col, zeros),
            grid_h=torch.where(valid, grid_h, zeros),
            grid_w=torch.where(valid, grid_w, zeros),
            valid=valid,
            prunable=valid.clone(),
            part=frame,  # each frame is a grid of its own (pooling pools frame by frame)
            frame=frame,
        )

    def _scatter_kind(self, maps: list[torch.Tensor], mask: torch.Tensor, grid_thw: Any, kind: int) -> None:
        """Write (item, row, col, grid_h, grid_w, frame) of one kind's placeholders (mask (B, L)) into the
        (B, L) `maps`; item = 2 * (index among the sample's items of this kind) + kind (0 image, 1 video)."""
        seq_index, slot, valid, counts = visual_slots(mask)  # (B, N_kind)
        # image, row, col, grid_h, grid_w, frame
        placed = self._place_by_grid(counts, slot, valid, grid_thw, ("image", "video")[kind])
        values = (2 * placed[0] + kind, *placed[1:])
        for target, value in zip(maps, values, strict=True):
            current = target.gather(1, seq_index)
            target.scatter_(1, seq_index, torch.where(valid, value, current))

    @staticmethod
    def _items_in_sequence_order(item: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, N) index of each token's item (image or video) among its sample's items, in sequence order: a
        new item starts wherever the (kind, index) key changes between consecutive visual tokens."""
        previous = torch.nn.functional.pad(item, (1, 0), value=-1)[:, :-1]  # (B, N)
        starts = (item != previous) & valid
        return (torch.cumsum(starts, dim=1) - 1).clamp(min=0)

    def _place_by_grid(
        self,
        counts: torch.Tensor,
        slot: torch.Tensor,
        valid: torch.Tensor,
        grid_thw: Any,
        kind: str = "image",
    ) -> tuple[torch.Tensor, ...]:
        """(image_index, row, col, grid_h, grid_w, frame), each (B, N), from one kind's grid_thw (I, 3)."""
        grid_thw = torch.as_tensor(grid_thw, device=slot.device).long().reshape(-1, 3)  # (I, 3)
        frames = grid_thw[:, 0]  # (I,)
        rows_per_image = grid_thw[:, 1] // self.merge  # (I,) grid height in language-model tokens
        cols_per_image = grid_thw[:, 2] // self.merge  # (I,)
        per_frame = rows_per_image * cols_per_image  # (I,)
        ends = torch.cumsum(frames * per_frame, dim=0)  # (I,) end of each image in the batch's token stream
        starts = ends - frames * per_frame

        # The model fills the image tokens of the whole batch, sample after sample, with the images' features
        # in image_grid_thw order: token `slot` of sample b is token offset[b] + slot of that stream.
        offset = torch.cumsum(counts, dim=0) - counts  # (B,)
        self._check_alignment(counts, offset, starts, ends, kind)
        stream = torch.where(valid, offset[:, None] + slot, torch.zeros_like(slot))  # (B, N)
        image = torch.searchsorted(ends, stream, right=True).clamp(max=len(ends) - 1)  # (B, N) global image
        first_image = torch.searchsorted(ends, offset, right=True)  # (B,) global index of each sample's first
        within = stream - starts[image]  # (B, N) index inside the image's tokens, frame after frame
        in_frame = within % per_frame[image]
        width = cols_per_image[image]
        frame = within // per_frame[image]
        row, col = in_frame // width, in_frame % width
        return image - first_image[:, None], row, col, rows_per_image[image], width, frame

    def _place_without_grids(
        self,
        input_ids: torch.Tensor,
        seq_index: torch.Tensor,
        valid: torch.Tensor,
        position_ids: torch.Tensor,
        inputs: Mapping[str, Any],
    ) -> tuple[torch.Tensor, ...]:
        """(image_index, row, col, grid_h, grid_w, frame), each (B, N), when the forward received M-RoPE
        positions instead of grids: Qwen2-VL writes each image and each video as one run of placeholders."""
        return self._place_by_positions(self.visual_token_mask(input_ids), seq_index, valid, position_ids)

    @staticmethod
    def _place_by_positions(
        is_image: torch.Tensor, seq_index: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """(image_index, row, col, grid_h, grid_w, frame), each (B, N), from M-RoPE position ids (3 or 4, B,
        L).

        An image is a run of image tokens (as for `get_rope_index`, which places each run of one modality as
        one image); inside it the height / width positions are start + row / start + col (the last two rows
        of the position ids; a leading fourth row holds 1-D text positions).
        """
        batch, n = seq_index.shape
        run_start = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]  # (B, L)
        image = (torch.cumsum(run_start, dim=1) - 1).gather(1, seq_index)  # (B, N) image of each token
        height = position_ids[-2].to(seq_index.device).long().gather(1, seq_index)  # (B, N)
        width = position_ids[-1].to(seq_index.device).long().gather(1, seq_index)
        images = int(image[valid].max()) + 1
        # One bucket per (sample, image); batch padding slots go to an extra bucket that nobody reads.
        key = torch.where(
            valid, torch.arange(batch, device=image.device)[:, None] * images + image, batch * images
        )
        key = key.flatten()
        buckets = batch * images + 1

        def reduce(values: torch.Tensor, how: str) -> torch.Tensor:
            out = torch.zeros(buckets, dtype=values.dtype, device=values.device)
            return out.scatter_reduce(0, key, values.flatten(), how, include_self=False)[key].view(batch, n)

        top, left = reduce(height, "amin"), reduce(width, "amin")
        row, col = height - top, width - left
        # Frames of a video: its distinct temporal positions in order (steps of 1 in Qwen2-VL, of
        # tokens_per_second * seconds per frame in Qwen2.5-VL); an image has one.
        time = position_ids[-3].to(seq_index.device).long().gather(1, seq_index)  # (B, N)
        frame = torch.zeros_like(time)
        several = valid & (reduce(time, "amax") > reduce(time, "amin"))  # (B, N) tokens of multi-frame items
        for bucket in key.view(batch, n)[several].unique().tolist():
            members = key.view(batch, n) == bucket
            frame[members] = torch.unique(time[members], return_inverse=True)[1]
        return image, row, col, reduce(row, "amax") + 1, reduce(col, "amax") + 1, frame

    def _check_alignment(
        self,
        counts: torch.Tensor,
        offset: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        kind: str = "image",
    ) -> None:
        """Every sample's image (video) tokens must be whole images (videos) of their grid_thw, in order."""
        total, described = int(counts.sum()), int(ends[-1]) if len(ends) else 0
        has_images = counts > 0
        aligned = (
            torch.isin(offset[has_images], starts).all()
            and torch.isin((offset + counts)[has_images], ends).all()
        )
        if total != described or not bool(aligned):
            raise ValueError(
                f"the prompts hold {counts.tolist()} {kind} tokens per sample, which are not whole {kind}s "
                f"of {kind}_grid_thw (tokens per {kind}: {(ends - starts).tolist()}, after the "
                f"{self.merge} x {self.merge} merge); build prompts and {kind}s with the model's own "
                f"processor, {kind}s in prompt order, sample after sample"
            )


@ADAPTERS.register("qwen2_vl_frames")
class Qwen2VLFramesAdapter(Qwen2VLAdapter):
    """Qwen2-VL / Qwen2.5-VL with one budget per video frame (`model.adapter=qwen2_vl_frames`): each frame of
    a video is an item of the layout (`image_index`), so `keep` / `ratio` apply per frame and
    `kept_visual_indices` list each frame on its own. Images are unchanged. Never picked automatically."""

    name = "qwen2_vl_frames"
    budget_per_frame = True
    auto = False
