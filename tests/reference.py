"""Independent references for the engine tests, written against the untouched model.

Nothing here uses the pruning engine: kept tokens come from eager attention with `output_attentions=True`,
and the pruned forward is run layer by layer with the dropped tokens removed by plain indexing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlavaForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from conftest import GRID, IMAGE_TOKEN, TOKENS_PER_IMAGE


def linear_row_weights(alpha: float) -> torch.Tensor:
    """w = 1 - alpha * row / (GRID - 1) for the GRID x GRID raster, written out independently."""
    rows = torch.arange(TOKENS_PER_IMAGE) // GRID
    return 1.0 - alpha * rows.double() / (GRID - 1)


def reference_kept_raster(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    layer: int,
    keep: int,
    weights: torch.Tensor,
) -> list[list[int]]:
    """FastV's choice for one unpadded sample, from eager attention weights: per image, sorted raster ids."""
    assert model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
    attention = out.attentions[layer - 1][0]  # (H, L, L) of the only sample
    last_row = attention[:, -1, :].mean(dim=0).double()  # (L,)
    image_positions = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten()
    kept = []
    for image in range(len(image_positions) // TOKENS_PER_IMAGE):
        positions = image_positions[image * TOKENS_PER_IMAGE : (image + 1) * TOKENS_PER_IMAGE]
        scores = last_row[positions] * weights
        # Highest score first; equal scores: earlier token first.
        ranking = sorted(range(TOKENS_PER_IMAGE), key=lambda i: (-scores[i].item(), i))
        kept.append(sorted(ranking[:keep]))
    return kept


def reference_kept(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    layer: int,
    keep: int,
    weight: Callable[[int, int, int, int], float],
) -> list[list[int]]:
    """As `reference_kept_raster`, the prior given as `weight(row, col, grid_h, grid_w)` of each grid cell."""
    weights = torch.tensor(
        [weight(r // GRID, r % GRID, GRID, GRID) for r in range(TOKENS_PER_IMAGE)], dtype=torch.float64
    )
    return reference_kept_raster(model, input_ids, pixel_values, layer, keep, weights)


def merged_embeddings(
    model: LlavaForConditionalGeneration, input_ids: torch.Tensor, pixel_values: torch.Tensor
):
    embeds = model.model.language_model.embed_tokens(input_ids)
    features = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    embeds = embeds.clone()
    embeds[input_ids == IMAGE_TOKEN] = features.to(embeds.dtype)
    return embeds


def reference_pruned_logits(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    layer: int,
    kept_positions: torch.Tensor,
) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose tokens outside `kept_positions` are removed by hand
    from decoder layer `layer` on (kept tokens keep their original RoPE positions)."""
    assert input_ids.shape[0] == 1
    language_model = model.model.language_model
    with torch.no_grad():
        hidden = merged_embeddings(model, input_ids, pixel_values)
        positions = torch.arange(input_ids.shape[1])[None]
        cos, sin = language_model.rotary_emb(hidden, positions)
        mask = create_causal_mask(language_model.config, hidden, None, None, positions)
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden, cos, sin = hidden[:, kept_positions], cos[:, kept_positions], sin[:, kept_positions]
                positions = positions[:, kept_positions]
                mask = create_causal_mask(language_model.config, hidden, None, None, None)
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions
            )
        return model.lm_head(language_model.norm(hidden))


def reference_compact_logits(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    layer: int,
    kept_positions: torch.Tensor,
) -> torch.Tensor:
    """As `reference_pruned_logits`, but from decoder layer `layer` on the kept tokens are a new sequence
    with RoPE positions 0..L'-1 (what the official PyramidDrop / SparseVLM / FasterVLM code does)."""
    assert input_ids.shape[0] == 1
    language_model = model.model.language_model
    with torch.no_grad():
        hidden = merged_embeddings(model, input_ids, pixel_values)
        positions = torch.arange(input_ids.shape[1])[None]
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden = hidden[:, kept_positions]
                positions = torch.arange(len(kept_positions))[None]
            cos, sin = language_model.rotary_emb(hidden, positions)
            mask = create_causal_mask(language_model.config, hidden, None, None, positions)
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions
            )
        return model.lm_head(language_model.norm(hidden))


def kept_positions_from_raster(input_ids: torch.Tensor, kept_raster: list[list[int]]) -> torch.Tensor:
    """Sequence positions that survive pruning: all text tokens plus the kept image tokens."""
    ids = input_ids[0]
    image_positions = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
    dropped = set(image_positions)
    for image, raster in enumerate(kept_raster):
        for r in raster:
            dropped.discard(image_positions[image * TOKENS_PER_IMAGE + r])
    return torch.tensor([i for i in range(len(ids)) if i not in dropped])
