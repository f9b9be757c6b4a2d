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

Video tokens (`<|video_pad|>`) are not in the layout (never scored, never pruned, counted as text); they
still receive their DeepStack features. The vision tower has no [CLS] token and its tokens merge 2 x 2
patches, so methods that read the vision tower (FasterVLM) are refused, as for Qwen2-VL.

The MoE checkpoints (`Qwen3VLMoeForConditionalGeneration`, e.g. Qwen3-VL-30B-A3B) have the same vision
tower, prompt layout, M-RoPE and DeepStack, with sparse-expert MLPs in the decoder layers (routing is per
token, so it needs nothing from the pruner): one adapter for both.
"""

from __future__ import annotations

from typing import Any

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
