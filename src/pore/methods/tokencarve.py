"""TokenCarve (Tan et al., 2025): rank image tokens by attention and by their share of the image's
information (SVD), keep 1.5x the budget, then merge the most redundant half-budget away by similarity.

At the start of layer K (2 for LLaVA-1.5-7B), for each image (official `TokenCarve/modeling_llama.py`,
`layer_idx == Token_carve_work_layer`; `Token_carve_image_token_rank = int(T / 2 * 3)`,
`Token_carve_merge_token_nums = int(T / 2)` for a budget of T tokens, TokenCarve_model_vqa_loader.py):

1. attention value (AV): the last prompt token's attention to the image tokens in layer K-1, mean over heads
   (the score the engine multiplies by the prior, as the PoRe authors multiply AV by their weights);
2. spectral value (SV): the SVD U S V^T of the image tokens' hidden states entering layer K (n, D);
   a token's value is the sum over its row of |U S|;
3. both rankings become points: the token ranked j-th (0-based) by AV gets (n - j) * w, by SV
   (n - j) * (1 - w), w = 0.5 (`Token_carve_SV_AV_weight`); the int(1.5 T) tokens with the most points
   stay, best first;
4. merging: the better half (int(0.5 * count)) is set A, the rest set B; each B token finds its most
   similar A token (cosine of the hidden states); the int(T / 2) B tokens with the highest such similarity
   are averaged into their A token (mean of the A token and all merged into it) and dropped. T remain.

The official code removes the tokens and renumbers the sequence (`position_ids = arange`), so
`strategy.positions=official` is `compact`. It runs batch size 1 with one image; here every image of every
sample is carved on its own, batched over the samples (a loop over the images of a sample only).

Options: `mode` (official `Token_carve_SV_AV_mode`): `fused` (0, default), `spectral` (1: SV alone),
`attention` (2: AV alone); `av_weight` (w above); `merge=false` keeps the top T by the ranking, no merging.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import LastTokenAttention

MODES = ("fused", "spectral", "attention")


def descending_rank(values: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """(B, N) long: each token's place (0 = best) in the descending order of `values` (B, N) among the
    tokens `among` (B, N) bool (ties to the earlier token); the others come after them."""
    ranked = torch.where(among, values, torch.full_like(values, float("-inf")))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N)
    slot = torch.arange(values.shape[1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, slot)


def spectral_values(states: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """(B, N) float64: per sample, the row sums of |U S| of the SVD of the rows `among` (B, N) of `states`
    (B, N, D); the other rows are zeroed first (a zero row adds nothing to |U S|) and score 0."""
    rows = states.float() * among[..., None]  # (B, N, D)
    left, singular, _ = torch.linalg.svd(rows, full_matrices=False)  # (B, N, k), (B, k)
    return ((left.abs() * singular[:, None, :]).sum(dim=-1) * among).double()  # (B, N)


@METHODS.register("tokencarve")
class TokenCarve(PruningMethod):
    requests = (LastTokenAttention(),)
    official_positions = "compact"  # the official code removes the tokens and renumbers (docs/methods.md)
    max_stages: ClassVar[int | None] = 1  # one carving at the work layer
    prior_use = "any"  # the AV ranking is the language model's attention: the authors weight it

    def __init__(
        self, seed: int = 0, mode: str = "fused", av_weight: float = 0.5, merge: bool = True
    ) -> None:
        super().__init__(seed)
        if mode not in MODES:
            raise ValueError(f"tokencarve: unknown options.mode {mode!r}; valid values: {', '.join(MODES)}")
        if isinstance(av_weight, bool) or not isinstance(av_weight, (int, float)) or not 0 <= av_weight <= 1:
            raise ValueError(f"tokencarve: options.av_weight must be a number in [0, 1], got {av_weight!r}")
        self.mode, self.av_weight, self.merge_tokens = mode, float(av_weight), bool(merge)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """AV: the last prompt token's attention in layer K-1 (B, N); the carving happens in `recycle`."""
        assert inputs.last_token_attention is not None
        return inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-select each image's tokens by the official ranking and merging; the engine's top-k only gives
        the budget T of each image (its kept count)."""
        layout = inputs.layout
        candidates = inputs.candidates()  # (B, N)
        states = hidden.gather(1, layout.seq_index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, N, D)
        carved, new_kept = hidden.clone(), kept & ~candidates
        for image in range(int(layout.images_per_sample.max()) if candidates.numel() else 0):
            in_image = candidates & (layout.image_index == image)  # (B, N)
            if not bool(in_image.any()):
                continue
            budget = (kept & in_image).sum(dim=1)  # (B,) T of this image in each sample
            ranking = self.ranking(scores, states, in_image)  # (B, N)
            order = torch.sort(
                torch.where(in_image, ranking, torch.full_like(ranking, float("-inf"))),
                dim=1,
                descending=True,
                stable=True,
            ).indices  # (B, N) best first
            chosen = self.carve(carved, states, layout.seq_index, order, budget, in_image.sum(dim=1))
            new_kept |= chosen & in_image
        return carved, new_kept

    def ranking(self, attention: torch.Tensor, states: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
        """(B, N) float64, higher = better: the official mode's ranking of the tokens `among` (B, N)."""
        if self.mode == "attention":
            return attention
        spectral = spectral_values(states, among)
        if self.mode == "spectral":
            return spectral
        count = among.sum(dim=1, keepdim=True)  # (B, 1): n, the points of the best token
        by_attention = (count - descending_rank(attention, among)).double()
        by_spectrum = (count - descending_rank(spectral, among)).double()
        return by_attention * self.av_weight + by_spectrum * (1 - self.av_weight)

    def carve(
        self,
        hidden: torch.Tensor,
        states: torch.Tensor,
        seq_index: torch.Tensor,
        order: torch.Tensor,
        budget: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        """(B, N) bool: the tokens of one image that stay; merged A tokens are written into `hidden`
        (B, L_cur, D) in place. `order` (B, N): slots best first; `budget` / `count` (B,): T and n."""
        batch, slots = order.shape
        kept = torch.zeros(batch, slots, dtype=torch.bool, device=order.device)
        if not self.merge_tokens:  # the top T by the ranking
            return kept.scatter_(1, order, torch.arange(slots, device=order.device) < budget[:, None])
        top = torch.minimum(budget * 3 // 2, count)  # (B,) int(T / 2 * 3), at most the image's tokens
        half = top // 2  # (B,) set A: int(0.5 * len(top))
        merged_count = top - budget  # (B,) int(T / 2) (0 when keeping every token)
        width = int(top.max())
        place = torch.arange(width, device=order.device)[None, :]  # (1, R)
        listed = order[:, :width]  # (B, R) slots, best first
        in_a, in_b = place < half[:, None], (place >= half[:, None]) & (place < top[:, None])
        rows = states.gather(1, listed[..., None].expand(-1, -1, states.shape[-1])).float()  # (B, R, D)
        metric = F.normalize(rows, dim=-1)
        similarity = (metric @ metric.transpose(1, 2)).masked_fill(~in_a[:, None, :], float("-inf"))
        best, target = similarity.max(dim=-1)  # (B, R): each row's most similar A token
        best = torch.where(in_b, best, torch.full_like(best, float("-inf")))
        merged = in_b & (descending_rank(best, in_b) < torch.minimum(half, merged_count)[:, None])  # (B, R)
        # A token becomes the mean of itself and the B tokens merged into it.
        into = torch.where(merged, target, torch.zeros_like(target))[..., None].expand_as(rows)
        total = rows.clone().scatter_add_(1, into, rows * merged[..., None])
        members = torch.ones_like(best).scatter_add_(1, into[..., 0], merged.float())
        sample, place_a = (in_a & (members > 1)).nonzero(as_tuple=True)
        positions = seq_index.gather(1, listed)  # (B, R)
        hidden[sample, positions[sample, place_a]] = (total / members[..., None])[sample, place_a].to(
            hidden.dtype
        )
        stays = in_a | (in_b & ~merged)  # (B, R)
        sample, place_kept = stays.nonzero(as_tuple=True)
        kept[sample, listed[sample, place_kept]] = True
        return kept
