"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a base view, then unpadded, size-capped anyres
tiles and newlines; a SigLIP vision tower without [CLS].

How transformers lays out the visual tokens of one image (`LlavaOnevisionModel.pack_image_features`), for an
S x S vision grid (S = 384 / 14 = 27 for llava-onevision-qwen2-*-ov-hf):

1. the base view: the whole image squashed to one encoder input, S x S tokens in raster order;
2. the high-resolution view: the image resized into the best of `config.image_grid_pinpoints` (1 x 1 to 6 x 6
   tiles of 384 px), encoded tile by tile, put back into one grid and cropped to the image's aspect ratio
   (`unpad_image`), as LLaVA-NeXT does; then, new here, shrunk bilinearly to about `max` tiles' worth of
   tokens when it holds more than 1.1 x that (`vision_aspect_ratio="anyres_max_9"`: ratio = sqrt(H * W /
   (9 * S * S)) > 1.1 gives an int(H // ratio) x int(W // ratio) grid): an H x W grid;
3. after each of those H rows, one `image_newline` token (a learned embedding).

A sample with several images (`batch_num_images` > 1, as the processor gives nested image lists) gets only
each image's base view, then one newline. All of them are `<image>` placeholders in `input_ids`.

Videos (`<video>` placeholders): each frame's S x S features pooled to P x P (P = ceil(S / 2)), frame after
frame, then one newline for the video. A video is one item of the layout (one budget), its tokens carry
(frame, row, col) (`VisualLayout.frame`; `part` = frame, so pooling pools each frame on its own); one
budget per frame instead with `model.adapter=llava_onevision_frames`.

The adapter gives (row, col) in the base S x S grid for base tokens and in the final H x W grid for
high-resolution ones (a shrunk grid's tokens mix several encoder patches, so there is no tile frame); newline
tokens are valid, never prunable and carry the position of the token before them. One budget per image
over its base and high-resolution tokens (as for LLaVA-NeXT); `ratio` is the meaningful budget, since the
token count varies with the image size.

The layout comes from the model's own packing run on "features" that say which part a token belongs to, so
it cannot drift from the real forward; when generate() hands the forward pre-encoded images (transformers >=
5.23), it is read off the packed features (the newline embedding marks the row ends).

No vision [CLS]: SigLIP has none, so FasterVLM (the encoder's [CLS] attention) is refused here: its official
code (and every published port we know of) scores CLIP's [CLS] row only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pore import compat
from pore.adapters.base import ADAPTERS, ModelAdapter, VisionEncoder, VisualLayout
from pore.adapters.llava_next import BASE, HIGH_RES, LAYOUT_CACHE_SIZE, NEWLINE, ImageTokens, LlavaNextAdapter
from pore.adapters.llava_next import image_size_to_num_patches as num_views


@ADAPTERS.register("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (`llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf`), in the whole-image frame.

    Shares LLaVA-NeXT's batch assembly (images fill the samples' placeholders in order) and its whole-image
    positions; differs in the packing (size cap, base-only images of multi-image samples) and the tower.
    """

    name = "llava_onevision"
    #: whether every frame of a video is an item of its own (its own budget) instead of the whole video
    budget_per_frame: bool = False
    encodes_views = False  # no vision requests: nothing maps the tower's positions to tokens here
    vision_requests = False  # SigLIP: no [CLS]; shrunk grids mix patches
    processor_class = "LlavaOnevisionProcessor"

    classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    model_types = ("llava_onevision",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, position_frame="image")
        self.aspect_ratio: str = getattr(model.config, "vision_aspect_ratio", "anyres_max_9")
        self.video_token_id: int = model.config.video_token_id

    # ------------------------------------------------------------------ one image

    def image_tokens(self, height: int, width: int, tiled: bool = True) -> ImageTokens:  # type: ignore[override]
        """The visual tokens of one image of `height` x `width` pixels: tiled (it is its sample's only
        image) or its base view alone (an image of a multi-image sample)."""
        key = (int(height), int(width), "tiled" if tiled else "base")
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        part = self._packed_parts(int(height), int(width), key[2] == "tiled")
        tokens = self._cache[key] = self._positions(part, None, None)
        if len(self._cache) > LAYOUT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return tokens

    def _packed_parts(self, height: int, width: int, tiled: bool) -> torch.Tensor:
        """(T,) long: BASE, HIGH_RES or NEWLINE for each token of one image, in sequence order, from the
        model's own `pack_image_features` run on one-channel features that hold the part. The bilinear
        shrink averages equal values within the high-resolution grid, so the part survives it."""
        config = self.model.config
        views = num_views((height, width), config.image_grid_pinpoints, self.encoder_size) if tiled else 1
        per_view = self.side * self.side
        part = torch.full((views, per_view, 1), float(HIGH_RES))  # (V, S*S, 1)
        part[0] = BASE
        packed, _ = self.multimodal_module().pack_image_features(
            [part],
            torch.tensor([[height, width]]),
            image_newline=torch.tensor([float(NEWLINE)]),
            vision_aspect_ratio=self.aspect_ratio,
        )
        return packed[0][:, 0].round().long()  # (T,)

    def _tokens_from_features(self, features: torch.Tensor) -> ImageTokens:
        """The visual tokens of one image from its packed features (T, D), when generate() hands the forward
        pre-encoded images: the base view's S * S tokens come first; newlines equal `image_newline`."""
        newline = self.multimodal_module().image_newline.to(features)  # (D,)
        part = torch.where((features == newline).all(dim=-1), NEWLINE, HIGH_RES).cpu()  # (T,)
        part[: self.side * self.side] = BASE
        return self._positions(part, None, None)

    def _positions(
        self, part: torch.Tensor, tile_row: torch.Tensor | None, tile_col: torch.Tensor | None
    ) -> ImageTokens:
        """Grid positions of one image's tokens (T,): LLaVA-NeXT's whole-image frame, plus the base-only
        image of a multi-image sample (S * S base tokens, then one newline with the last base position)."""
        per_view = self.side * self.side
        if part.shape[0] != per_view + 1:
            return super()._positions(part, None, None)
        if bool((part[:per_view] != BASE).any()) or int(part[-1]) != NEWLINE:
            raise RuntimeError(
                "the LLaVA-OneVision image tokens are not a base view followed by one newline token; has "
                "transformers' packing changed?"
            )
        index = torch.arange(per_view + 1).clamp(max=per_view - 1)
        side = torch.full_like(index, self.side)
        return ImageTokens(part=part, row=index // self.side, col=index % self.side, grid_h=side, grid_w=side)

    # ------------------------------------------------------------------ a batch

    def _images(self, image_inputs: Mapping[str, Any]) -> list[ImageTokens]:
        """The visual tokens of every image of the batch, in order: from the pre-encoded features when the
        forward got them (they are the truth, whatever sizes `set_image_sizes` adds), else from
        `image_sizes` and `batch_num_images` (images of a multi-image sample are not tiled, as the model
        decides; without `batch_num_images` the model tiles every image, and so does this)."""
        encoded = compat.pre_encoded_images(image_inputs)
        if encoded is not None:
            return [self._tokens_from_features(features) for features in encoded.pooler_output]
        sizes = image_inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(
                "LLaVA-OneVision pruning needs image_sizes (the processor returns them) to place the image "
                "tokens; pass them to the model / generate() with pixel_values"
            )
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
        per_sample = image_inputs.get("batch_num_images")
        per_sample = [1] * len(sizes) if per_sample is None else [int(n) for n in per_sample]
        tiled = [n == 1 for n in per_sample for _ in range(n)]
        if len(tiled) != len(sizes):
            raise ValueError(
                f"batch_num_images {per_sample} does not add up to the {len(sizes)} image_sizes; build the "
                "inputs with the model's own processor (LlavaOnevisionProcessor)"
            )
        return [self.image_tokens(int(h), int(w), t) for (h, w), t in zip(sizes, tiled, strict=True)]

    # ------------------------------------------------------------------ videos

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: image and video placeholders (`<image>`, `<video>`)."""
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        """Images as LLaVA-NeXT's layout reads them; with video tokens, every image and video of a sample as
        one item each, in prompt order, video tokens carrying their frame (`frame`, and `part` so that
        pooling pools frame by frame)."""
        image_inputs = image_inputs or {}
        is_video = input_ids == self.video_token_id
        if not bool(is_video.any()):
            return super().visual_layout(input_ids, image_inputs)
        is_image = input_ids == self.image_token_id
        images = self._assign(is_image, self._images(image_inputs) if bool(is_image.any()) else [], "image")
        videos = self._assign(is_video, self._videos(image_inputs), "video")
        is_visual = is_image | is_video
        counts = is_visual.sum(dim=1).tolist()
        per_sample, frames = [], []
        for b in range(len(counts)):
            # Items in prompt order: by the sequence position of their first token.
            items = sorted(images[b] + videos[b], key=lambda item: item[0])
            per_sample.append([tokens for _, tokens, _ in items])
            frames.append(torch.cat([frame for _, _, frame in items]) if items else torch.zeros(0))
        layout = self._batch_layout(is_visual, counts, per_sample)
        frame = torch.zeros_like(layout.seq_index)
        for b, sample_frames in enumerate(frames):
            frame[b, : len(sample_frames)] = sample_frames.to(frame.device)
        video_slot = is_video.gather(1, layout.seq_index) & layout.valid  # (B, N)
        layout.part = torch.where(video_slot, frame, layout.grid_part)
        layout.frame = frame
        if self.budget_per_frame:  # every frame of a video its own item (images have one frame)
            layout.image_index = _items_in_order(
                layout.image_index * (int(frame.max()) + 1) + frame, layout.valid
            )
        return layout

    def _videos(self, image_inputs: Mapping[str, Any]) -> list[tuple[ImageTokens, torch.Tensor]]:
        """Each video's tokens (frames pooled 2 x 2 to P x P, P = ceil(S / 2), frame after frame, then one
        newline) and their frames, from `pixel_values_videos` (videos, T, C, H, W) or, when generate()
        encoded them first, the features' lengths (T * P * P + 1)."""
        pooled = -(-self.side // 2)
        per_frame = pooled * pooled
        pixels = image_inputs.get("pixel_values_videos")
        encoded = (image_inputs.get(compat.PRE_ENCODED_IMAGES_KEY) or {}).get("video")
        if pixels is not None:
            lengths = [int(pixels.shape[1])] * int(pixels.shape[0])
        elif encoded is not None:
            lengths = [(int(features.shape[0]) - 1) // per_frame for features in encoded.pooler_output]
        else:
            raise ValueError(
                "LLaVA-OneVision video tokens need pixel_values_videos (the processor returns them) to place "
                "them; pass them to the model / generate()"
            )
        videos = []
        for length in lengths:
            index = torch.arange(length * per_frame + 1).clamp(max=length * per_frame - 1)
            part = torch.full(index.shape, HIGH_RES)
            part[-1] = NEWLINE
            within = index % per_frame
            side = torch.full_like(index, pooled)
            tokens = ImageTokens(
                part=part, row=within // pooled, col=within % pooled, grid_h=side, grid_w=side
            )
            videos.append((tokens, index // per_frame))
        return videos

    def _assign(
        self, mask: torch.Tensor, items: list[Any], kind: str
    ) -> list[list[tuple[int, ImageTokens, torch.Tensor]]]:
        """Per sample, (first position, tokens, frame (T,)) of the images or videos that fill its `mask`
        placeholders, in order (as masked_scatter fills them): sample b takes the next items until their
        token counts add up to its own."""
        counts = mask.sum(dim=1).tolist()
        out: list[list[tuple[int, ImageTokens, torch.Tensor]]] = [[] for _ in counts]
        next_item = 0
        for b, count in enumerate(counts):
            positions = mask[b].nonzero().flatten().tolist()
            total = 0
            while total < count and next_item < len(items):
                item = items[next_item]
                tokens, frame = (
                    item if isinstance(item, tuple) else (item, torch.zeros(len(item), dtype=torch.long))
                )
                out[b].append((positions[total], tokens, frame))
                total += len(tokens)
                next_item += 1
            if total != count:
                next_item = -1
                break
        if next_item != len(items):
            raise ValueError(
                f"the prompts hold {counts} {kind} tokens per sample, which are not whole {kind}s of the "
                f"inputs; build the prompts with the model's own processor ({self.processor_class})"
            )
        return out

    # ------------------------------------------------------------------ the vision tower

    def vision_encoder(self) -> VisionEncoder:
        raise NotImplementedError(
            "the llava_onevision adapter does not map its SigLIP tower's positions to visual tokens (SigLIP "
            "has no [CLS] token, and shrunk high-resolution grids mix patches), so requests of the vision "
            "tower (VisionHiddenStates, VisionAttention, VisionKeys) are not supported for it"
        )

    def vision_token_index(
        self, layout: VisualLayout, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        return ModelAdapter.vision_token_index(self, layout, image_inputs)


@ADAPTERS.register("llava_onevision_frames")
class LlavaOnevisionFramesAdapter(LlavaOnevisionAdapter):
    """LLaVA-OneVision with one budget per video frame (`model.adapter=llava_onevision_frames`): each frame
    of a video is an item of the layout, so `keep` / `ratio` apply per frame (the video's newline goes with
    its last frame). Images are unchanged. Never picked automatically."""

    name = "llava_onevision_frames"
    budget_per_frame = True
    auto = False


def _items_in_order(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N) index of each token's item among its sample's items, in sequence order: a new item starts
    wherever `key` (B, N) changes between consecutive visual tokens."""
    previous = torch.nn.functional.pad(key, (1, 0), value=-1)[:, :-1]
    return (torch.cumsum((key != previous) & valid, dim=1) - 1).clamp(min=0)


__all__ = ["LlavaOnevisionAdapter", "LlavaOnevisionFramesAdapter"]
