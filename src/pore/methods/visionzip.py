"""VisionZip (Yang et al., CVPR 2025): dominant tokens by [CLS] attention, contextual tokens merged.

The official code (dvlab-research/VisionZip, `visionzip/clip_encoder.py`) works in the encoder layer that
produces the language model's features (`attentions[-2]`, `hidden_states[-2]`):

- dominant tokens: the top tokens by the [CLS] query's attention to the patches, summed over heads (the
  same ranking as our mean over heads, `VisionAttention()`);
- contextual tokens: the remaining tokens, in sequence order, give C targets at a regular step
  (`step = max(1, R // C)`, targets at 0, step, 2 step, ...); every other remaining token joins the target
  its key (that layer's keys, mean over heads, L2-normalised: `VisionKeys()`) is most similar to (cosine);
  a contextual token is its target's features plus the mean of the tokens that joined it.

The budget's split (`strategy.options.contextual`): null = the official ratio 10 of every 64 (54 + 10 for 64,
108 + 20 for 128, 162 + 30 for 192: budget * 10 // 64 contextual); an integer sets C. It prunes before the
language model (K = 0) and removes the tokens (`positions=official` = `compact`).

Departures, forced by the transformers LLaVA (docs/methods.md): the official dominant tokens include the
[CLS] token (dominant=54 keeps [CLS] + 53 patches), which is not a visual token here, so 54 patches are kept;
the merge sums the language model's input embeddings (after the projector) where the official code sums the
vision features before it; a contextual token takes its target's slot (the official code appends the
contextual tokens after the dominant ones, which compact positions renumber in the same order otherwise).
LLaVA-NeXT: each view keeps its equal share of the image's budget, split as above (the official code runs
each view through the rule). Qwen2-VL has no [CLS] token: refused, as FasterVLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import VisionAttention, VisionKeys
from pore.methods.view_groups import Bucket, buckets, scatter_kept

CONTEXTUAL_PER_64 = 10  # official: 54 dominant + 10 contextual for 64 tokens (108 + 20, 162 + 30)


def contextual_targets(remaining: int, contextual: int) -> torch.Tensor:
    """(C',) the indices, among the `remaining` non-dominant tokens in sequence order, of the contextual
    targets: every `max(1, remaining // contextual)`-th one from the first, at most `contextual`."""
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step)[:contextual]


def visionzip_select(
    scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official rule on G groups of n tokens: scores (G, n) [CLS] attention, keys (G, n, d).

    Returns dominant (G, n) bool; targets (G, C') the indices of the contextual targets; merged (G, M) the
    indices of the tokens merged into a target and assignment (G, M) which target (0..C'-1) each joins."""
    groups, n = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties: the earlier token
    is_dominant = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :dominant], True)
    # (G, R) the other tokens, in sequence order
    remaining = torch.sort(is_dominant.int(), dim=1, stable=True).indices[:, : n - dominant]
    if contextual == 0 or remaining.shape[1] == 0:
        empty = remaining[:, :0]
        return is_dominant, empty, empty, empty
    columns = contextual_targets(remaining.shape[1], contextual).to(scores.device)
    is_target = torch.zeros(remaining.shape[1], dtype=torch.bool, device=scores.device)
    is_target[columns] = True
    targets, merged = remaining[:, columns], remaining[:, ~is_target]  # (G, C'), (G, M)
    metric = F.normalize(keys.float(), dim=-1)  # (G, n, d)
    rows = torch.arange(groups, device=scores.device)[:, None]
    similarity = metric[rows, merged] @ metric[rows, targets].transpose(1, 2)  # (G, M, C')
    return is_dominant, targets, merged, similarity.argmax(dim=2)


@METHODS.register("visionzip")
class VisionZip(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens
    prior_use = "suppression"  # [CLS] attention: only PoRe's padding / sink suppression applies
    max_stages = 1
    requests = (VisionAttention(), VisionKeys())  # the feature layer's [CLS] row and keys

    def __init__(self, seed: int = 0, contextual: int | None = None) -> None:
        super().__init__(seed)
        if contextual is not None and (
            isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0
        ):
            raise ValueError(
                f"visionzip: options.contextual must be null or an integer >= 0, got {contextual!r}"
            )
        self.contextual = contextual

    def split(self, budget: int) -> tuple[int, int]:
        """(dominant, contextual) tokens for a group that keeps `budget`."""
        contextual = budget * CONTEXTUAL_PER_64 // 64 if self.contextual is None else self.contextual
        contextual = min(contextual, budget)
        return budget - contextual, contextual

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.vision_attention is not None
        return inputs.vision_attention.double()  # (B, N)

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view: the dominant tokens by score (x the suppression prior), the contextual targets carrying
        their merged tokens; as many tokens as the engine's top-k kept of each image."""
        keys = inputs[VisionKeys()].mean(dim=2)  # (B, N, d): mean over heads, as the official metric
        hidden = hidden.clone()
        choices = []
        for bucket in buckets(inputs, kept):
            dominant, contextual = self.split(bucket.budget)
            is_dominant, targets, merged, assignment = visionzip_select(
                bucket.gather(scores), bucket.gather(keys), dominant, contextual
            )
            chosen = is_dominant.scatter(1, targets, True)  # (G, n)
            if merged.shape[1]:
                self._merge(inputs, hidden, bucket, targets, merged, assignment)
            choices.append((bucket, chosen))
        return hidden, scatter_kept(inputs, kept, choices)

    @staticmethod
    def _merge(
        inputs: ScoringInputs,
        hidden: torch.Tensor,
        bucket: Bucket,
        targets: torch.Tensor,
        merged: torch.Tensor,
        assignment: torch.Tensor,
    ) -> None:
        """In place: each target's hidden state (B, L_cur, D) += the mean of the tokens assigned to it."""
        sequence = bucket.sequence(inputs)  # (G, n)
        rows = bucket.sample[:, None]
        target_seq, merged_seq = sequence.gather(1, targets), sequence.gather(1, merged)  # (G, C'), (G, M)
        one_hot = F.one_hot(assignment, targets.shape[1]).float()  # (G, M, C')
        counts = one_hot.sum(dim=1).clamp(min=1)[..., None]  # (G, C', 1)
        mean = one_hot.transpose(1, 2) @ hidden[rows, merged_seq].float() / counts  # (G, C', D)
        hidden[rows, target_seq] = (hidden[rows, target_seq].float() + mean).to(hidden.dtype)
