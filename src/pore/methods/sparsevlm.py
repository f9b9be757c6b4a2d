"""SparseVLM-style scoring (Zhang et al., ICML 2025): text "raters" vote for the image tokens.

In layer K-1 every text token of the prompt attends to the image tokens. The raters are the text tokens
most relevant to the image: those whose mean attention over the candidate image tokens is at least the
mean over all text tokens (SparseVLM's selection rule). An image token's score is the mean attention the
raters pay it. This keeps SparseVLM's scoring but not its adaptive per-layer budget: the budget is the
strategy's, so methods compare at equal cost.

`merge=True` recycles the dropped tokens instead of discarding them: each dropped token is averaged into
the kept token of the same image whose hidden state it is most similar to (cosine similarity), so the
information of the dropped tokens survives in fewer tokens (SparseVLM recycles by clustering the dropped
tokens into extra tokens; merging into the kept ones keeps the budget exact).
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs


@METHODS.register("sparsevlm")
class SparseVLM(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens (docs/methods.md)
    attention_queries = "text"

    def __init__(self, seed: int = 0, merge: bool = False) -> None:
        super().__init__(seed)
        self.merge_dropped = bool(merge)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.text_attention is not None and inputs.text_valid is not None
        layout = inputs.layout
        queries = inputs.text_attention.shape[1]
        index = layout.seq_index[:, None, :].expand(-1, queries, -1)  # (B, Q, N)
        to_visual = inputs.text_attention.gather(2, index).double()  # (B, Q, N)
        valid = inputs.text_valid  # (B, Q)
        candidates = inputs.candidates()[:, None, :]  # (B, 1, N)
        to_visual = torch.where(candidates & valid[:, :, None], to_visual, torch.zeros_like(to_visual))
        # Relevance of each text token to the image: its mean attention over the candidate image tokens.
        relevance = to_visual.sum(dim=2) / candidates.sum(dim=2).clamp(min=1)  # (B, Q)
        mean_relevance = (relevance * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(
            min=1
        )  # (B, 1)
        raters = valid & (relevance >= mean_relevance)  # (B, Q); never empty: the maximum passes
        votes = (to_visual * raters[:, :, None]).sum(dim=1)  # (B, N)
        return votes / raters.sum(dim=1, keepdim=True).clamp(min=1)

    def merge(self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        if not self.merge_dropped:
            return hidden
        layout = inputs.layout
        dropped = inputs.candidates() & ~kept  # (B, N)
        receivers = kept & layout.valid & layout.prunable  # (B, N)
        merged = hidden.clone()
        for b in range(hidden.shape[0]):
            source, target = dropped[b].nonzero()[:, 0], receivers[b].nonzero()[:, 0]  # slots
            if source.numel() == 0 or target.numel() == 0:
                continue
            h_source = hidden[b, layout.seq_index[b, source]].float()  # (S, D)
            h_target = hidden[b, layout.seq_index[b, target]].float()  # (T, D)
            similarity = (
                torch.nn.functional.normalize(h_source, dim=-1)
                @ torch.nn.functional.normalize(h_target, dim=-1).T
            )  # (S, T)
            same_image = layout.image_index[b, source][:, None] == layout.image_index[b, target][None, :]
            similarity = similarity.masked_fill(~same_image, float("-inf"))
            assignment = similarity.argmax(dim=1)  # (S,) the kept token each dropped one joins
            total = h_target.clone().index_add_(0, assignment, h_source)  # (T, D)
            count = torch.ones(target.numel(), device=hidden.device).index_add_(
                0, assignment, torch.ones(source.numel(), device=hidden.device)
            )
            merged[b, layout.seq_index[b, target]] = (total / count[:, None]).to(hidden.dtype)
        return merged
