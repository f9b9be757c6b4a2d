"""What the official [CLS]-attention methods read from the tiny LLaVA's vision tower, computed by hand.

The tiny CLIP has 2 encoder layers and `vision_feature_layer=-2`: the features are `hidden_states[1]`, the
output of encoder layer 0, so that layer's attention and keys are the ones the official code reads
(`attentions[-2]`, `encoder.layers[-2]`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class VisionReference(NamedTuple):
    cls_attention: torch.Tensor  # (V, P) the [CLS] row of the feature layer to each patch, mean over heads
    keys: torch.Tensor  # (V, P, H, d) the feature layer's key states of the patches
    features: torch.Tensor  # (V, P, D_v) the feature layer's output at the patches (before the projector)


def vision_reference(model: nn.Module, pixel_values: torch.Tensor) -> VisionReference:
    """Eager CLIP on `pixel_values` (V views); restores the model's vision attention implementation."""
    saved = model.config.vision_config._attn_implementation
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            tower = model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
            layer = model.model.vision_tower.encoder.layers[0]
            keys = layer.self_attn.k_proj(layer.layer_norm1(tower.hidden_states[0]))[:, 1:]  # (V, P, D_v)
    finally:
        model.set_attn_implementation({"vision_config": saved})
    heads = model.config.vision_config.num_attention_heads
    return VisionReference(
        cls_attention=tower.attentions[0][:, :, 0, 1:].mean(dim=1),
        keys=keys.unflatten(-1, (heads, -1)),
        features=tower.hidden_states[1][:, 1:],
    )


def ranked(scores: torch.Tensor) -> list[int]:
    """Indices by descending score, ties to the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
