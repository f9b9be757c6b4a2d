"""The prunable tokens of each image of a batch, packed as rows of a padded tensor.

Selection rules that compare an image's tokens with each other (diversity, determinantal point processes,
duplicates of pivots) run on every image of the batch at once: each (sample, image) becomes one row of a
(G, M) table of token slots, padded with -1, so that the rule is one batched tensor program whatever the
number of images per sample or tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pore.methods.base import ScoringInputs


@dataclass(frozen=True)
class ImageGroups:
    """G images of a batch, M = the most candidate tokens of any of them."""

    sample: torch.Tensor  # (G,) long: the sample each image belongs to
    slots: torch.Tensor  # (G, M) long: the token slot n (of the layout's N) of each member; 0 for padding
    member: torch.Tensor  # (G, M) bool: a real member (not padding of the M axis)
    budget: torch.Tensor  # (G,) long: how many tokens the image keeps (`inputs.budget` of its count)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) per-token values -> (G, M, ...) per member (padding: the value of slot 0)."""
        return values[self.sample[:, None], self.slots]

    def scatter_order(self, order: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(G, K) member index picked at step k (-1: none) -> (B, N) float64 scores whose per-image top-k is
        the picks: K - k for the token picked at step k, 0 for the others."""
        scores = torch.zeros(shape, dtype=torch.float64, device=order.device)
        picked = order >= 0
        steps = order.shape[1] - torch.arange(order.shape[1], device=order.device, dtype=torch.float64)
        rows = self.sample[:, None].expand_as(order)[picked]
        cols = self.slots.gather(1, order.clamp(min=0))[picked]
        scores[rows, cols] = steps.expand_as(order)[picked]
        return scores


def image_groups(inputs: ScoringInputs) -> ImageGroups:
    """The candidate tokens (`inputs.candidates()`) of every image, in sequence order, one row per image."""
    candidates = inputs.candidates()  # (B, N)
    layout = inputs.layout
    device = candidates.device
    batch, tokens = candidates.nonzero(as_tuple=True)  # sequence order within each sample
    images = int(layout.image_index[candidates].max()) + 1 if batch.numel() else 1
    key = batch * images + layout.image_index[batch, tokens]  # one key per (sample, image)
    keys, group, counts = torch.unique(key, return_inverse=True, return_counts=True)
    order = torch.sort(group, stable=True).indices  # members of a group stay in sequence order
    batch, tokens, group = batch[order], tokens[order], group[order]
    starts = torch.cumsum(counts, 0) - counts  # (G,)
    rank = torch.arange(group.numel(), device=device) - starts[group]
    width = max(int(counts.max()) if counts.numel() else 1, 2)  # >= 2: the second-nearest neighbour exists
    slots = torch.zeros(keys.numel(), width, dtype=torch.long, device=device)
    member = torch.zeros(keys.numel(), width, dtype=torch.bool, device=device)
    slots[group, rank] = tokens
    member[group, rank] = True
    budget = torch.tensor([inputs.budget(int(count)) for count in counts.tolist()], device=device)
    return ImageGroups(sample=keys // images, slots=slots, member=member, budget=budget.long())
