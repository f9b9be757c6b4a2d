"""The groups a vision-tower method selects in: each view of each image, with its share of the budget.

VisionZip, VisPruner and PruMerge select inside one encoder view at a time (the official code runs each view
of LLaVA-NeXT's base image and tiles through its rule, each with its [CLS] row). The engine's per-image top-k
says how many tokens an image keeps; that budget is split equally between the image's views (as FasterVLM's
per_view budget). Groups with the same size and budget are stacked into buckets, so each rule runs batched
over all of them: on LLaVA-1.5 every image is one bucket of (images, 576).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pore.methods.base import ScoringInputs
from pore.methods.fastervlm import view_quotas


@dataclass(frozen=True)
class Bucket:
    """G groups of n candidate tokens each, all with the same budget."""

    sample: torch.Tensor  # (G,) long: the sample of each group
    slots: torch.Tensor  # (G, n) long: the group's tokens (indices into the N axis), in sequence order
    budget: int  # tokens each group keeps

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """(G, n, ...) the rows of a (B, N, ...) per-token tensor for the groups' tokens."""
        return values[self.sample[:, None], self.slots]

    def sequence(self, inputs: ScoringInputs) -> torch.Tensor:
        """(G, n) long: where the groups' tokens sit in the current sequence."""
        return inputs.layout.seq_index[self.sample[:, None], self.slots]


def buckets(inputs: ScoringInputs, kept: torch.Tensor) -> list[Bucket]:
    """The candidate tokens of every (sample, image, view), each view with its share of the number of the
    image's tokens the engine kept (`kept` (B, N) bool), grouped into buckets of equal size and budget."""
    layout = inputs.layout
    candidates = inputs.candidates()  # (B, N)
    views = inputs.vision_views if inputs.vision_views is not None else torch.zeros_like(layout.image_index)
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for b in range(kept.shape[0]):
        for image in layout.image_index[b][candidates[b]].unique().tolist():
            in_image = candidates[b] & (layout.image_index[b] == image)  # (N,)
            view_ids = views[b][in_image].unique().tolist()
            members = [(in_image & (views[b] == v)).nonzero()[:, 0] for v in view_ids]
            quotas = view_quotas(int((kept[b] & in_image).sum()), [len(m) for m in members])
            for slots, quota in zip(members, quotas, strict=True):
                groups.setdefault((len(slots), quota), []).append((b, slots))
    device = kept.device
    return [
        Bucket(
            sample=torch.tensor([b for b, _ in members], device=device),
            slots=torch.stack([slots for _, slots in members]),
            budget=budget,
        )
        for (_, budget), members in groups.items()
    ]


def scatter_kept(
    inputs: ScoringInputs, kept: torch.Tensor, choices: list[tuple[Bucket, torch.Tensor]]
) -> torch.Tensor:
    """(B, N) bool: tokens this stage may not drop stay, plus each bucket's chosen tokens ((G, n) bool)."""
    chosen = kept & ~inputs.candidates()
    for bucket, chosen_local in choices:
        rows = bucket.sample[:, None].expand_as(bucket.slots)
        chosen[rows[chosen_local], bucket.slots[chosen_local]] = True
    return chosen
