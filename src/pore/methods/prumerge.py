"""PruMerge+ and PruMerge (Shang et al., LLaVA-PruMerge): IQR outliers of [CLS] attention, merged neighbours.

The official code (42Shawn/LLaVA-PruMerge, `llava/model/multimodal_encoder/clip_encoder.py`,
`token_prune_merge_advanced_plus` / `token_prune_merge_advanced`) reads the last encoder layer (`layers[23]`)
through hooks on its q_proj / k_proj: the [CLS] attention is one softmax of q k^T / sqrt(C) with the heads
concatenated (`VisionAttention(-1, heads="joint")`), the keys are that layer's (`VisionKeys(-1)`, flattened).

- adaptive budget: the outliers of the [CLS] attention, the values above Q3 + 1.5 IQR (linear-interpolated
  quartiles, as `np.percentile`), give ratio = outliers / n; the top int(n * ratio) tokens are kept;
- PruMerge+ (`variant: plus`, default; the code's `forward`): spatially uniform additions, every
  int(int(1 / ratio) / 3)-th token of 0..n-2 that is not kept already;
- merging: each kept token adds its 32 most similar other tokens (cosine of the keys), weighted by their
  [CLS] attention (a weighted sum, not normalised); one extra token, the attention-weighted sum of every
  dropped token, is kept too. So an image keeps a data-dependent count: outliers + additions + 1.

`strategy.keep` / `ratio` do not set the count in the adaptive (official) mode; `adaptive: false` keeps the
strategy's budget instead: the top budget - 1 by attention plus the extra token (no spatial additions).
`merge: false` drops the merging and the extra token (the choice alone). Departures (docs/methods.md): the
official quartiles are over the whole batch (it runs batch size 1), here over each image view; no outlier
(the official code divides by zero) keeps the top token; the merge sums the language model's input
embeddings (after the projector) where the official code sums the vision features before it; kept tokens
stay in sequence order and the extra token takes the first dropped token's slot (the official code orders
them by attention, the additions after, the extra token last). It prunes before the language model (K = 0)
and removes the tokens (`compact` positions). Qwen2-VL has no [CLS] token: refused, as FasterVLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import VisionAttention, VisionKeys
from pore.methods.view_groups import Bucket, buckets, scatter_kept

VARIANTS = ("plus", "prumerge")
NEIGHBOURS = 32  # official: each kept token merges its 32 most similar tokens
IQR_FENCE = 1.5  # official: outliers lie above Q3 + 1.5 IQR
CLS_ATTENTION = VisionAttention(layer=-1, heads="joint")
KEYS = VisionKeys(layer=-1)


def outlier_ratio(scores: torch.Tensor) -> torch.Tensor:
    """(G,) float64: the share of each row of scores (G, n) above Q3 + 1.5 IQR (the official ratio)."""
    quartiles = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64), dim=1)
    upper = quartiles[1] + IQR_FENCE * (quartiles[1] - quartiles[0])  # (G,)
    return (scores.double() > upper[:, None]).sum(dim=1).double() / scores.shape[1]


def prumerge_select(scores: torch.Tensor, plus: bool) -> torch.Tensor:
    """(G, n) bool: the official adaptive choice of scores (G, n): the top int(n * ratio) (at least 1: the
    official code divides by zero without outliers), and with `plus` the uniform additions."""
    groups, n = scores.shape
    ratio = outlier_ratio(scores).clamp(min=1 / n)  # (G,)
    counts = (n * ratio).floor().long()  # the official int(N * reduction_ratio)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties: the earlier token
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=scores.device).expand(groups, -1)
    )
    chosen = rank < counts[:, None].to(scores.device)
    if plus:
        # step_length = int(1 / ratio); every int(step_length / 3)-th token of 0..n-2 (the code's 575)
        step = ((1 / ratio).floor() / 3).floor().long().clamp(min=1).to(scores.device)  # (G,)
        place = torch.arange(n, device=scores.device)
        chosen |= (place[None] % step[:, None] == 0) & (place[None] < n - 1)
    return chosen


def top_budget(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """(G, n) bool: the top `budget` of each row, ties to the earlier token."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :budget]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def merge_weights(keys: torch.Tensor, attention: torch.Tensor, neighbours: int) -> torch.Tensor:
    """(G, n, n): row i holds the [CLS] attention of token i's `neighbours` most similar other tokens
    (cosine of keys (G, n, d)), 0 elsewhere; attention (G, n)."""
    n = keys.shape[1]
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (G, n, n)
    similarity.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # "the other tokens"
    nearest = similarity.topk(min(neighbours, n - 1), dim=2).indices  # (G, n, k)
    values = attention.float()[:, None, :].expand(-1, n, -1).gather(2, nearest)
    return torch.zeros_like(similarity).scatter_(2, nearest, values)


@METHODS.register("prumerge")
class PruMerge(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens
    prior_use = "suppression"  # [CLS] attention: only PoRe's padding / sink suppression applies
    max_stages = 1
    requests = (CLS_ATTENTION, KEYS)  # the last encoder layer's joint-head [CLS] row and keys

    def __init__(
        self, seed: int = 0, variant: str = "plus", adaptive: bool = True, merge: bool = True
    ) -> None:
        super().__init__(seed)
        if variant not in VARIANTS:
            raise ValueError(
                f"prumerge: unknown options.variant {variant!r}; valid values: {', '.join(VARIANTS)}"
            )
        for name, value in (("adaptive", adaptive), ("merge", merge)):
            if not isinstance(value, bool):
                raise ValueError(f"prumerge: options.{name} must be true or false, got {value!r}")
        self.plus, self.adaptive, self.merging = variant == "plus", adaptive, merge

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        return inputs[CLS_ATTENTION].double()  # (B, N)

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view: the choice (scores: [CLS] attention x the suppression prior), then the merge."""
        hidden = hidden.clone()
        choices = []
        for bucket in buckets(inputs, kept):
            ranked = bucket.gather(scores)  # (G, n)
            if self.adaptive:
                chosen = prumerge_select(ranked, self.plus)
            else:
                chosen = top_budget(ranked, bucket.budget - 1 if self.merging else bucket.budget)
            if self.merging:
                chosen = self._merge(inputs, hidden, bucket, chosen)
            choices.append((bucket, chosen))
        return hidden, scatter_kept(inputs, kept, choices)

    @staticmethod
    def _merge(
        inputs: ScoringInputs, hidden: torch.Tensor, bucket: Bucket, chosen: torch.Tensor
    ) -> torch.Tensor:
        """In place on hidden (B, L_cur, D): kept tokens += their neighbours' attention-weighted sum; the
        extra token (the dropped tokens' attention-weighted sum) into the first dropped slot. -> chosen."""
        attention = bucket.gather(inputs[CLS_ATTENTION]).float()  # (G, n)
        keys = bucket.gather(inputs[KEYS]).flatten(2)  # (G, n, H * d): the heads concatenated
        rows, sequence = bucket.sample[:, None], bucket.sequence(inputs)  # (G, 1), (G, n)
        states = hidden[rows, sequence].float()  # (G, n, D)
        merged = states + merge_weights(keys, attention, NEIGHBOURS) @ states
        extra = ((attention * ~chosen)[..., None] * states).sum(dim=1)  # (G, D)
        states = torch.where(chosen[..., None], merged, states)
        dropped = ~chosen
        first = torch.where(dropped, torch.arange(chosen.shape[1], device=chosen.device), chosen.shape[1])
        first = first.min(dim=1).values  # (G,): n where nothing is dropped
        has_extra = first < chosen.shape[1]
        slot = first.clamp(max=chosen.shape[1] - 1)
        group = torch.arange(chosen.shape[0], device=chosen.device)
        states[group[has_extra], slot[has_extra]] = extra[has_extra]
        hidden[rows, sequence] = states.to(hidden.dtype)
        chosen = chosen.clone()
        chosen[group[has_extra], slot[has_extra]] = True
        return chosen
