"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): a base view, then unpadded anyres tiles and newlines.

How transformers lays out the visual tokens of one image (`LlavaNextModel.pack_image_features`), for an
S x S vision grid (S = vision image_size / patch_size, 24 for llava-v1.6 at 336 px / 14):

1. the base view: the whole image squashed to one encoder input, S x S tokens in raster order;
2. the high-resolution view: the image resized into the best of `config.image_grid_pinpoints` (aspect ratio
   kept, centred on a padded canvas of th x tw tiles), encoded tile by tile, the tiles' features put back
   into one (th * S) x (tw * S) grid, then cropped back to the image's aspect ratio (`unpad_image`): an
   H x W grid whose size depends on `image_sizes`;
3. after each of those H rows, one `image_newline` token (a learned embedding, the same for every row).

All of them are `<image>` placeholders in `input_ids`. The adapter gives:

- base tokens: (row, col) in the S x S base grid;
- high-resolution tokens, `position_frame="image"` (default): (row, col) in the whole unpadded H x W grid,
  so a prior sees the image's rows from top to bottom across tiles; `position_frame="tile"`: (row, col)
  inside the S x S tile the encoder saw (tile rows cropped by unpadding keep their in-tile numbers);
- newline tokens: valid but never prunable (they mark the row structure the model was trained with); they
  carry the position of the token they follow, so every position stays inside its grid.

Budget: the engine's top-k runs per image over all of the image's prunable tokens, so the base and the
high-resolution tokens of an image compete for one budget (`keep`, or `ratio` of their total); the newlines
come on top and are always kept. Because the token count varies with the image size, `ratio` is usually
the more meaningful budget for this family. `PruningRecord.kept_raster` counts an image's prunable tokens
in sequence order (base raster first, then the high-resolution raster without newlines);
`LlavaNextAdapter.image_tokens(height, width)` maps those indices back to (part, row, col). The record's
visual token counts include the newlines.

Where the layout comes from: `image_sizes` (the processor's original (height, width) of each image) fix the
layout; the adapter runs the model's own `pack_image_features` on coordinates, so it cannot drift from the
real packing. In transformers 5.23 (not 5.17), `generate()` encodes the images before the first forward and
hands it `mm_encoder_outputs` without `image_sizes`; the adapter then reads the layout off the packed
features (the newline embedding marks the row ends), which fixes the whole-image frame but not the tiles:
the tile frame needs `image_sizes` (a plain forward, or generate() in transformers 5.17).

Choosing the frame: `LlavaNextAdapter(model, position_frame="tile")` in Python, or the registered name
`llava_next_tile` (`model.adapter=llava_next_tile` in the config); auto-detection gives `llava_next`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from pore import compat
from pore.adapters.base import ADAPTERS, ModelAdapter, VisionEncoder, VisualLayout
from pore.adapters.llava import clip_vision_encoder

PositionFrame = Literal["image", "tile"]
POSITION_FRAMES: tuple[str, ...] = ("image", "tile")

LAYOUT_CACHE_SIZE = 128  # image sizes whose token layout is kept

# Which part of an image a visual token belongs to.
BASE, HIGH_RES, NEWLINE = 0, 1, 2


@dataclass(frozen=True)
class ImageTokens:
    """The visual tokens of one image in sequence order (T = their count), as the engine will see them."""

    part: torch.Tensor  # (T,) long: BASE, HIGH_RES or NEWLINE
    row: torch.Tensor  # (T,) long: row in the token's grid (see the module docstring for the frames)
    col: torch.Tensor  # (T,) long
    grid_h: torch.Tensor  # (T,) long: rows of the token's grid
    grid_w: torch.Tensor  # (T,) long

    def __len__(self) -> int:
        return self.part.shape[0]

    @property
    def prunable(self) -> torch.Tensor:
        """(T,) bool: every token but the row separators."""
        return self.part != NEWLINE


@ADAPTERS.register("llava_next")
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT / LLaVA-1.6. `position_frame` ("image" or "tile") says where high-resolution tokens sit."""

    name = "llava_next"
    default_frame: PositionFrame = "image"
    encodes_views = True  # the base image and its tiles
    vision_requests = True  # CLIP views: each visual token is one patch of one view
    processor_class = "LlavaNextProcessor"  # named in errors: the processor that writes the placeholders

    classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    model_types = ("llava_next",)

    def __init__(self, model: nn.Module, position_frame: PositionFrame | None = None) -> None:
        super().__init__(model)
        frame = position_frame or self.default_frame
        if frame not in POSITION_FRAMES:
            raise ValueError(
                f"unknown LLaVA-NeXT position_frame {frame!r}; choose one of: {', '.join(POSITION_FRAMES)}"
            )
        self.position_frame: PositionFrame = frame
        config = model.config
        self.image_token_id: int = config.image_token_id
        vision = config.vision_config
        self.encoder_size: int = vision.image_size  # pixels per side of one encoder input (a tile)
        self.side: int = vision.image_size // vision.patch_size  # S: tokens per side of a tile's grid
        self.default_strategy: str = getattr(config, "vision_feature_select_strategy", "default")
        # Layouts depend only on the image size, and benchmarks repeat sizes: keep the recent ones (bounded,
        # as a benchmark may hold thousands of sizes of ~3k tokens each).
        self._cache: OrderedDict[tuple[int, int, str], ImageTokens] = OrderedDict()

    # ------------------------------------------------------------------ one image

    def image_tokens(self, height: int, width: int, strategy: str | None = None) -> ImageTokens:
        """The visual tokens of one image of `height` x `width` pixels (its original size, `image_sizes`)."""
        strategy = strategy or self.default_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
        key = (int(height), int(width), strategy)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        packed = self._packed_coordinates(*key)  # (T, 4)
        tokens = self._cache[key] = self._positions(packed[:, 0], packed[:, 2], packed[:, 3])
        if len(self._cache) > LAYOUT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return tokens

    def _packed_coordinates(self, height: int, width: int, strategy: str) -> torch.Tensor:
        """(T, 4) long: (part, tile, row in tile, col in tile) of each token of one image, in sequence order.

        Rather than re-deriving transformers' tiling, cropping and newline placement, this runs the model's
        own `pack_image_features` on "features" that are coordinates: what comes out is the token order of
        the real forward by construction. The tile channel is -1 for the base view and for newlines.
        """
        config = self.model.config
        # Base view + tiles, as the model splits `pixel_values`.
        views = image_size_to_num_patches((height, width), config.image_grid_pinpoints, self.encoder_size)
        # Every view gives S * S tokens: "default" drops CLIP's CLS token, and "full" only packs (in
        # transformers) for encoders without one.
        per_view = self.side * self.side
        view = torch.arange(views)[:, None].expand(views, per_view)  # (V, S*S)
        within = torch.arange(per_view)[None].expand(views, per_view)  # (V, S*S)
        part = torch.where(view == 0, BASE, HIGH_RES)
        coordinates = torch.stack([part, view - 1, within // self.side, within % self.side], dim=-1)
        newline = torch.tensor([NEWLINE, -1, -1, -1])
        # Float32 holds these small integers exactly; the packing only reshapes, crops and concatenates.
        packed, _ = self.multimodal_module().pack_image_features(
            [coordinates.float()],
            torch.tensor([[height, width]]),
            vision_feature_select_strategy=strategy,
            image_newline=newline.float(),
        )
        return packed[0].round().long()  # (T, 4)

    def _tokens_from_features(self, features: torch.Tensor) -> ImageTokens:
        """The visual tokens of one image from its packed features (T, D), when `image_sizes` are gone.

        In transformers 5.23 (not 5.17), `generate()` encodes the images before the first forward and hands
        the model `mm_encoder_outputs` instead of `pixel_values` / `image_sizes`. The packed features still
        show the layout: the base view's S * S tokens come first, and every high-resolution row ends with an
        exact copy of the learned `image_newline` embedding. In-tile positions cannot be recovered from them.
        """
        if self.position_frame == "tile":
            raise ValueError(
                "position_frame='tile' needs image_sizes, but this forward received pre-encoded images "
                "(mm_encoder_outputs, as generate() passes them in transformers 5.23); use the 'image' frame"
            )
        newline = self.multimodal_module().image_newline.to(features)  # (D,)
        part = torch.where((features == newline).all(dim=-1), NEWLINE, HIGH_RES).cpu()  # (T,)
        part[: self.side * self.side] = BASE
        return self._positions(part, None, None)

    def _positions(
        self, part: torch.Tensor, tile_row: torch.Tensor | None, tile_col: torch.Tensor | None
    ) -> ImageTokens:
        """Grid positions of one image's tokens from their parts (T,), per `position_frame`.

        `tile_row` / `tile_col` (T,): each high-resolution token's place in its tile (for the tile frame).
        """
        tokens = part.shape[0]
        per_view = self.side * self.side
        index = torch.arange(tokens)
        # Base view: the first S * S tokens, in raster order.
        row, col = index // self.side, index % self.side
        grid_h = torch.full((tokens,), self.side)
        grid_w = torch.full((tokens,), self.side)

        high_res = index >= per_view  # (T,) the unpadded grid and its newlines
        is_newline = part == NEWLINE
        rows, span = int(is_newline.sum()), int(high_res.sum())
        if (
            tokens <= per_view
            or bool((part[:per_view] != BASE).any())
            or rows == 0
            or span % rows
            or not bool(is_newline[high_res].view(rows, -1)[:, -1].all())
        ):
            raise RuntimeError(
                "the LLaVA-NeXT image tokens are not laid out as a base view followed by high-resolution "
                "rows that each end with one newline token; has transformers' packing changed?"
            )
        if self.position_frame == "image":
            width = span // rows - 1  # W: tokens per row without the newline
            k = torch.arange(span)  # index among the high-resolution tokens and newlines
            row[high_res] = k // (width + 1)
            col[high_res] = (k % (width + 1)).clamp(max=width - 1)  # a newline: the column before it
            grid_h[high_res], grid_w[high_res] = rows, width
        else:
            row[high_res], col[high_res] = tile_row[high_res], tile_col[high_res]
            # A newline carries the in-tile position of the token it follows.
            follows = (index - 1)[is_newline]
            row[is_newline], col[is_newline] = row[follows], col[follows]
        return ImageTokens(part=part, row=row, col=col, grid_h=grid_h, grid_w=grid_w)

    # ------------------------------------------------------------------ the vision tower

    def vision_encoder(self) -> VisionEncoder:
        return clip_vision_encoder(self.multimodal_module().vision_tower, self.model.config)

    def vision_token_index(
        self, layout: VisualLayout, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """Every image is encoded as its base view then its tiles (the views of all images in batch order, as
        `get_image_features` runs them): a base or high-resolution token's position is its view's first
        position + 1 ([CLS]) + its raster index inside the view; newlines have none (-1)."""
        sizes = (image_inputs or {}).get("image_sizes")
        strategy = (image_inputs or {}).get("vision_feature_select_strategy") or self.default_strategy
        if sizes is None:
            raise ValueError(
                "vision requests on LLaVA-NeXT (FasterVLM, per-view budgets, ...) need each image's size to "
                "find its tiles: pass image_sizes to the forward, or call pruner.set_image_sizes(...) before "
                "generate() (the pipeline does)"
            )
        if strategy != "default":
            raise NotImplementedError(
                "vision requests on LLaVA-NeXT need vision_feature_select_strategy='default'"
            )
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
        positions = self.vision_encoder().positions  # 1 + S * S
        per_image, view_offset = [], 0
        for height, width in sizes:
            packed = self._packed_coordinates(int(height), int(width), strategy)  # (T, 4)
            part, view = packed[:, 0], view_offset + packed[:, 1] + 1  # view 0 = base image, 1.. = tiles
            patch = 1 + packed[:, 2] * self.side + packed[:, 3]  # after the [CLS] position
            per_image.append(torch.where(part != NEWLINE, view * positions + patch, -1))
            view_offset += image_size_to_num_patches(
                (height, width), self.model.config.image_grid_pinpoints, self.encoder_size
            )
        index = torch.full(layout.seq_index.shape, -1, dtype=torch.long)
        first_image = 0
        for b, images in enumerate(layout.images_per_sample.tolist()):
            if images:
                sample = torch.cat(per_image[first_image : first_image + images])
                index[b, : sample.shape[0]] = sample
            first_image += images
        index = index.to(layout.seq_index.device)
        return torch.where(layout.valid, index, -1)

    # ------------------------------------------------------------------ a batch

    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        """The visual tokens of a prompt batch.

        Read from `image_inputs["image_sizes"]` (num_images, 2), the original (height, width) of every image
        of the batch in order, as the processor returns them; or, when the forward got pre-encoded images
        instead, from `image_inputs["mm_encoder_outputs"]["image"].pooler_output` (one (T, D) per image).
        """
        image_inputs = image_inputs or {}
        is_image = self.visual_token_mask(input_ids)  # (B, L)
        counts = is_image.sum(dim=1).tolist()  # (B,)
        per_sample: list[list[ImageTokens]] = [[] for _ in counts]
        if any(counts):
            images = self._images(image_inputs)
            # Images fill the samples' placeholders in order (as masked_scatter does): sample b takes the next
            # images until their token counts add up to its own.
            next_image = 0
            for b, count in enumerate(counts):
                total = 0
                while total < count and next_image < len(images):
                    per_sample[b].append(images[next_image])
                    total += len(images[next_image])
                    next_image += 1
                if total != count:
                    next_image = -1
                    break
            if next_image != len(images):
                raise ValueError(
                    f"the prompts hold {counts} image tokens per sample, but the images give "
                    f"{[len(image) for image in images]} tokens each; build the prompts with the model's own "
                    f"processor ({self.processor_class}) from the same images"
                )
        return self._batch_layout(is_image, counts, per_sample)

    def _images(self, image_inputs: Mapping[str, Any]) -> list[ImageTokens]:
        """The visual tokens of every image of the batch, in order."""
        sizes = image_inputs.get("image_sizes")
        if sizes is not None:
            sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
            strategy = image_inputs.get("vision_feature_select_strategy") or self.default_strategy
            return [self.image_tokens(int(h), int(w), strategy) for h, w in sizes]
        encoded = compat.pre_encoded_images(image_inputs)
        if encoded is not None:
            return [self._tokens_from_features(features) for features in encoded.pooler_output]
        raise ValueError(
            "LLaVA-NeXT pruning needs image_sizes (the processor returns them) to place the image tokens; "
            "pass them to the model / generate() with pixel_values"
        )

    @staticmethod
    def _batch_layout(
        is_image: torch.Tensor, counts: list[int], per_sample: list[list[ImageTokens]]
    ) -> VisualLayout:
        """Left-aligned (B, N) layout tensors; slots past a sample's count are invalid and point at 0."""
        batch, n = len(counts), max(counts, default=0)
        device = is_image.device
        fields = {name: torch.zeros(batch, n, dtype=torch.long) for name in ("seq", "image", "row", "col")}
        grid_h = torch.ones(batch, n, dtype=torch.long)
        grid_w = torch.ones(batch, n, dtype=torch.long)
        valid = torch.zeros(batch, n, dtype=torch.bool)
        prunable = torch.zeros(batch, n, dtype=torch.bool)
        part_index = torch.zeros(batch, n, dtype=torch.long)  # 0 = base grid, 1 = high-resolution grid
        for b, images in enumerate(per_sample):
            if not images:
                continue
            count = counts[b]
            fields["seq"][b, :count] = is_image[b].nonzero().flatten().cpu()
            fields["image"][b, :count] = torch.cat(
                [torch.full((len(image),), i) for i, image in enumerate(images)]
            )
            fields["row"][b, :count] = torch.cat([image.row for image in images])
            fields["col"][b, :count] = torch.cat([image.col for image in images])
            grid_h[b, :count] = torch.cat([image.grid_h for image in images])
            grid_w[b, :count] = torch.cat([image.grid_w for image in images])
            valid[b, :count] = True
            prunable[b, :count] = torch.cat([image.prunable for image in images])
            part_index[b, :count] = torch.cat([(image.part != BASE).long() for image in images])
        return VisualLayout(
            seq_index=fields["seq"].to(device),
            image_index=fields["image"].to(device),
            row=fields["row"].to(device),
            col=fields["col"].to(device),
            grid_h=grid_h.to(device),
            grid_w=grid_w.to(device),
            valid=valid.to(device),
            prunable=prunable.to(device),
            part=part_index.to(device),
        )


@ADAPTERS.register("llava_next_tile")
class LlavaNextTileAdapter(LlavaNextAdapter):
    """LLaVA-NeXT with high-resolution positions inside each tile (`model.adapter=llava_next_tile`).

    Never picked automatically: the whole-image frame is the default.
    """

    name = "llava_next_tile"
    default_frame: PositionFrame = "tile"
    auto = False
