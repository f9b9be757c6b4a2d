"""VisPruner (Zhang et al., ICCV 2025): important tokens by [CLS] attention, then diverse ones.

The official code (Theia-4869/VisPruner, `llava/model/llava_arch.py` `encode_images`, with
`clip_encoder.py` `feature_select`) reads the encoder layer behind the language model's features
(`attentions[select_layer]`, `hidden_states[select_layer]`):

- important tokens: the top int(T * r) tokens by the [CLS] query's attention to the patches, mean over heads
  (`VisionAttention()`); r = `strategy.options.important_ratio`, 0.5 by default (the code's default; its
  README runs 0.5 for 128 tokens and 0.75 for 64 on MME);
- diverse tokens: the rest, in descending attention order, lose their duplicates until T - int(T r) remain:
  at each step the remaining tokens are split alternately into A (even places) and B (odd places), each A
  token's duplicate score is its largest cosine similarity (of the layer's output features,
  `VisionHiddenStates()`) to a B token, the r' = min(8, R - T_div) A tokens with the largest scores are
  removed, and the list becomes the other A tokens (by descending score) followed by B.

It prunes before the language model (K = 0) and removes the tokens (`positions=official` = `compact`).
LLaVA-NeXT: each view keeps its equal share of the image's budget (the official code runs every view through
the rule with the same T). Qwen2-VL has no [CLS] token: refused, as FasterVLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import VisionAttention, VisionHiddenStates
from pore.methods.view_groups import buckets, scatter_kept

REMOVED_PER_STEP = 8  # official: at most 8 duplicates removed per matching step


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, diverse: int) -> torch.Tensor:
    """The official matching on G groups: features (G, n, D) L2-normalised, residual (G, R) the candidate
    indices in descending attention order -> (G, min(R, diverse)) the diverse tokens' indices."""
    rows = torch.arange(features.shape[0], device=features.device)[:, None]
    while diverse > 0:
        remaining = residual.shape[1]
        removed = min(REMOVED_PER_STEP, remaining - diverse)
        if removed <= 0:
            break
        tokens = features[rows, residual]  # (G, R, D)
        a, b = tokens[:, ::2], tokens[:, 1::2]  # (G, ceil(R / 2), D), (G, R // 2, D)
        duplicate = (a @ b.transpose(1, 2)).max(dim=2).values  # (G, ceil(R / 2))
        distinct = torch.sort(duplicate, dim=1, descending=True, stable=True).indices[:, removed:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=1)
    return residual


def vispruner_select(scores: torch.Tensor, features: torch.Tensor, budget: int, important_ratio: float):
    """(G, n) bool: the official choice of `budget` of n tokens by scores (G, n) and features (G, n, D)."""
    important = int(budget * important_ratio)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties: the earlier token
    chosen = order[:, :important]
    if budget > important:
        diverse = remove_duplicates(
            F.normalize(features.float(), dim=-1), order[:, important:], budget - important
        )
        chosen = torch.cat([chosen, diverse], dim=1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)


@METHODS.register("vispruner")
class VisPruner(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens
    prior_use = "suppression"  # [CLS] attention: only PoRe's padding / sink suppression applies
    max_stages = 1
    requests = (VisionAttention(), VisionHiddenStates())  # the feature layer's [CLS] row and output

    def __init__(self, seed: int = 0, important_ratio: float = 0.5) -> None:
        super().__init__(seed)
        if isinstance(important_ratio, bool) or not isinstance(important_ratio, int | float):
            raise ValueError(
                f"vispruner: options.important_ratio must be a number in [0, 1], got {important_ratio!r}"
            )
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(
                f"vispruner: options.important_ratio must be a number in [0, 1], got {important_ratio}"
            )
        self.important_ratio = float(important_ratio)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.vision_attention is not None
        return inputs.vision_attention.double()  # (B, N)

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view: the important tokens by score (x the suppression prior), then the diverse ones; as many
        tokens as the engine's top-k kept of each image."""
        features = inputs[VisionHiddenStates()]  # (B, N, D_v)
        choices = [
            (
                bucket,
                vispruner_select(
                    bucket.gather(scores), bucket.gather(features), bucket.budget, self.important_ratio
                ),
            )
            for bucket in buckets(inputs, kept)
        ]
        return hidden, scatter_kept(inputs, kept, choices)
