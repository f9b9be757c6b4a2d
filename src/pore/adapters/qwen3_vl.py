"""Qwen3-VL (dense and MoE): Qwen2-VL's token layout, interleaved M-RoPE, and DeepStack features.

Where the image tokens are and where each sits is as in Qwen2-VL (`pore.adapters.qwen2_vl`, which this
adapter extends): every `<|image_pad|>` of the prompt, one per 2 x 2 merged patch (32 x 32 pixels in the
real models: patch 16), in raster order of a dynamic (h / 2) x (w / 2) grid per image from `image_grid_thw`,
or, when generate() encoded the images first (transformers >= 5.23), from the 3-D M-RoPE positions the
forward receives (`get_vision_position_ids` gives the tokens of an image height / width positions
start + row / start + col, as Qwen2-VL's `get_rope_index` does).

M-RoPE: Qwen3-VL interleaves the time / height / width frequencies (`mrope_interleaved`) instead of giving
each a contiguous section; the language model still turns the position ids into one (cos, sin) pair of shape
(B, L, head_dim) that every decoder layer receives, so the engine gathers it for the kept tokens exactly as
for Qwen2-VL: kept tokens keep their original 3-D positions, and `strategy.positions=compact` is refused.

DeepStack: the vision tower also merges the outputs of some intermediate encoder blocks
(`vision_config.deepstack_visual_indexes`, e.g. 5, 11, 17 in the 2B model) into one feature per visual
token each, and the language model adds the i-th set to the visual tokens' hidden states after decoder
layer i (layers 0, 1, 2). It receives them as `visual_pos_masks` (B, L) and `deepstack_visual_embeds`
(one (M, D) tensor per layer); `take_layer_features` takes both out of its arguments, and the engine adds
each kept token's own features after those layers (`pore.engine.layer_features`): dropped tokens take their
DeepStack features with them, whether pruning happens before, inside or after the DeepStack layers.

Video: the processor writes each frame (one temporal patch: 2 frames of the clip merged) as its own run,
`<t seconds><|vision_start|>` + (h / 2) x (w / 2) `<|video_pad|>` + `<|vision_end|>`, the timestamps being
text, and `get_rope_index` places each frame as a one-frame grid starting at the current text position.
Video tokens are visual tokens as in Qwen2-VL: a video is one item of the layout (one budget; per frame with
`model.adapter=qwen3_vl_frames`), its tokens with (frame, row, col), read off `video_grid_thw`, which counts
tokens frame after frame whatever text sits between the frames. When generate() (transformers >= 5.23)
hands the forward M-RoPE positions and the encoder's outputs instead of the grids, every frame is a run of
its own in the positions, so the frames are put back into their videos by the encoder's token count per
video (`mm_encoder_outputs["video"]`). DeepStack features cover the video tokens too (`visual_pos_masks` is
image | video, rows in sequence order), so a dropped video token's DeepStack features go with it. The vision
tower has no [CLS] token and its tokens merge 2 x 2 patches, so methods that read the vision tower
(FasterVLM) are refused, as for Qwen2-VL.

The MoE checkpoints (`Qwen3VLMoeForConditionalGeneration`, e.g. Qwen3-VL-30B-A3B) have the same vision
tower, prompt layout, M-RoPE and DeepStack, with sparse-expert MLPs in the decoder layers (routing is per
token, so it needs nothing from the pruner): one adapter for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pore import compat
from pore.adapters.base import ADAPTERS, LayerFeatures
from pore.adapters.qwen2_vl import Qwen2VLAdapter

# The language model's arguments that carry DeepStack (both releases 5.17 and 5.24 name them so).
DEEPSTACK_MASK = "visual_pos_masks"
DEEPSTACK_FEATURES = "deepstack_visual_embeds"


@ADAPTERS.register("qwen3_vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (`Qwen/Qwen3-VL-*-Instruct`) and Qwen3-VL-MoE (`Qwen/Qwen3-VL-30B-A3B-Instruct`, ...)."""

    name = "qwen3_vl"
    classes = (
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLModel",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLMoeModel",
    )
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    adds_layer_features = True

    def take_layer_features(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], LayerFeatures | None]:
        mask, features = kwargs.get(DEEPSTACK_MASK), kwargs.get(DEEPSTACK_FEATURES)
        if features is None or mask is None:
            return kwargs, None
        taken = (DEEPSTACK_MASK, DEEPSTACK_FEATURES)
        rest = {key: value for key, value in kwargs.items() if key not in taken}
        return rest, LayerFeatures(mask=mask, features=list(features))

    def _place_without_grids(
        self,
        input_ids: torch.Tensor,
        seq_index: torch.Tensor,
        valid: torch.Tensor,
        position_ids: torch.Tensor,
        inputs: Mapping[str, Any],
    ) -> tuple[torch.Tensor, ...]:
        """As Qwen2-VL's, then each video's frames (one run each, timestamps between them) put back into one
        item with frame = the run's index in its video, from the encoder's token count per video."""
        image, row, col, grid_h, grid_w, frame = super()._place_without_grids(
            input_ids, seq_index, valid, position_ids, inputs
        )
        is_video = (input_ids.gather(1, seq_index) == self.video_token_id) & valid  # (B, N)
        if not bool(is_video.any()):
            return image, row, col, grid_h, grid_w, frame
        encoded = compat.pre_encoded_videos(inputs)
        if encoded is None:
            raise ValueError(
                "Qwen3-VL writes every video frame as its own run of <|video_pad|>: placing the frames in "
                "their videos needs video_grid_thw (or the video encoder's outputs); pass the processor's "
                "output to the model unchanged"
            )
        per_video = torch.tensor([len(tokens) for tokens in encoded.pooler_output], device=seq_index.device)
        ends = torch.cumsum(per_video, dim=0)  # (V,) end of each video in the batch's video-token stream
        counts = is_video.sum(dim=1)  # (B,)
        if int(counts.sum()) != int(ends[-1]):
            raise ValueError(
                f"the prompts hold {counts.tolist()} video tokens per sample but the video encoder gave "
                f"{per_video.tolist()} per video; build prompts and videos with the model's own processor"
            )
        # Batch-major stream index of each video token, as the model fills the placeholders.
        stream = (torch.cumsum(counts, dim=0) - counts)[:, None] + torch.cumsum(is_video, dim=1) - 1  # (B, N)
        stream = torch.where(is_video, stream, torch.zeros_like(stream))
        video = torch.searchsorted(ends, stream, right=True)  # (B, N) global index of each token's video
        within = stream - (ends - per_video)[video]  # (B, N) index inside the video, frame after frame
        frame = torch.where(is_video, within // (grid_h * grid_w).clamp(min=1), frame)
        # One item per video: the frames' runs share a key, images keep theirs (keys only need to differ).
        key = torch.where(is_video, int(image.max()) + 1 + video, image)
        return self._items_in_sequence_order(key, valid), row, col, grid_h, grid_w, frame


@ADAPTERS.register("qwen3_vl_frames")
class Qwen3VLFramesAdapter(Qwen3VLAdapter):
    """Qwen3-VL with one budget per video frame (`model.adapter=qwen3_vl_frames`), as `qwen2_vl_frames` for
    Qwen2-VL: each frame of a video is an item of its own. Images are unchanged. Never picked
    automatically."""

    name = "qwen3_vl_frames"
    budget_per_frame = True
    auto = False
