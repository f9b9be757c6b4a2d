"""The official FastV approach, re-implemented faithfully: eager attention and the full attention map.

FastV's released code (LLaVA codebase, `FastVLlamaModel`) runs the language model with eager attention and
asks layer K-1 for its attention weights (`output_attentions`), i.e. the full softmax(QK^T) matrix of shape
(B, H, L, L). At layer K it averages that matrix over heads, takes the last query's row, ranks the image
span by it with `topk`, keeps [text before the image] + [top-R image tokens] + [text after] in sorted
order, and slices hidden states, position ids and the mask.

Here: the language model must be in eager attention (every layer materialises its L x L weights, as in the
official code); a forward hook on layer K-1's attention module keeps the weights that eager returns, and
layer K's pre-hook does the head mean / last row / top-k and hands the index to the same gather and mask
code as the ideal (`SequenceReducer`), so that the two differ only by the scoring. The image span is fixed
per workload, like FastV's `image_start` / `image_len` settings. The official code handles batch size 1;
this version ranks each sample of a batch on its own, which is what the official code does for each sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pore.app.bench.reduce import SequenceReducer


class EagerFastV(SequenceReducer):
    """FastV with the attention map read from eager attention at layer K-1; keeps `keep` image tokens."""

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        keep: int,
        image_positions: torch.Tensor,
        text_positions: torch.Tensor,
    ) -> None:
        super().__init__(model, layer)
        implementation = self.adapter.language_model().config._attn_implementation
        if implementation != "eager":
            raise ValueError(
                "official FastV reads the attention weights that eager attention returns; the language "
                f"model uses {implementation!r} (model.set_attn_implementation({{'text_config': 'eager'}}))"
            )
        if not 0 < keep <= image_positions.shape[1]:
            raise ValueError(f"keep must be in 1..{image_positions.shape[1]}, got {keep}")
        self.keep = keep
        # Fixed per workload, like the official `image_start` / `image_len`: no search through input_ids.
        self.image_positions = image_positions  # (B, N)
        self.text_positions = text_positions  # (B, L - N)
        self._attention: torch.Tensor | None = None
        self.last_kept: torch.Tensor | None = None  # (B, keep) sorted raster indices kept at the last prefill

    def extra_hooks(self) -> list[Any]:
        attention = self.adapter.attention_module(self.layers[self.layer - 1])
        return [attention.register_forward_hook(self._on_scoring_attention)]

    def _on_scoring_attention(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._prefill:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(f"layer {self.layer - 1}'s attention returned no weights; is it eager?")
            self._attention = weights  # (B, H, L, L)

    def select(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        weights, self._attention = self._attention, None
        if weights is None:
            raise RuntimeError(f"layer {self.layer - 1} reported no attention weights during the prefill")
        # As the official code: mean over heads, the last query's row, the image span, top-k.
        last_row = weights.mean(dim=1)[:, -1, :]  # (B, L)
        image_scores = last_row.gather(1, self.image_positions)  # (B, N)
        top = image_scores.topk(self.keep, dim=1).indices  # (B, R) raster indices
        self.last_kept = top.sort(dim=1).values
        kept_positions = self.image_positions.gather(1, top)
        return torch.cat([self.text_positions, kept_positions], dim=1).sort(dim=1).values
