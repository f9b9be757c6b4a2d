"""Which visual tokens a stage keeps: method score x prior weight, then the top budget of each image.

Pure functions, tensors in, tensors out: the pruner hands them the stage's scores and the layout, they hand
back what survives. Ties go to the earlier token (a stable sort), so a choice is reproducible and a sample
keeps the same tokens alone or in a padded batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pore.adapters import VisualLayout
from pore.priors import PriorConfig, padding_fraction
from pore.strategy import PruningStage

ImageSizes = Sequence[Sequence[tuple[int, int]]]  # per sample, per image: the original (height, width)


def padding_weights(
    layout: VisualLayout, sizes: ImageSizes | None, threshold: float, pad_rule: str = "expand2square_area"
) -> torch.Tensor:
    """(B, N) float64: 0 for tokens that lie mostly (more than `threshold`) in the pad-to-square border of
    their image, 1 elsewhere; `pad_rule` says where the border falls (`pore.priors.padding`)."""
    batch = layout.seq_index.shape[0]
    if sizes is None or len(sizes) != batch:
        raise ValueError(
            "prior.suppress_padding needs each image's original (height, width): call "
            "pruner.set_image_sizes([[(h, w), ...] per sample]) before the forward"
        )
    weights = torch.ones(layout.seq_index.shape, dtype=torch.float64)
    image_index, grid_h, grid_w = layout.image_index.cpu(), layout.grid_h.cpu(), layout.grid_w.cpu()
    raster, in_grid = layout.raster.cpu(), (layout.valid & layout.prunable).cpu()
    for b, sample_sizes in enumerate(sizes):
        for i, (height, width) in enumerate(sample_sizes):
            tokens = in_grid[b] & (image_index[b] == i)
            if not bool(tokens.any()):
                raise ValueError(f"sample {b} has no image {i}, but an image size was given for it")
            h, w = int(grid_h[b][tokens][0]), int(grid_w[b][tokens][0])
            fraction = padding_fraction(h, w, height, width, pad_rule)[raster[b][tokens]]
            weights[b, tokens] = (fraction <= threshold).double()
    return weights


def weighted_scores(
    scores: torch.Tensor,
    layout: VisualLayout,
    prior: PriorConfig,
    reweight: bool,
    not_padding: torch.Tensor | None,
) -> torch.Tensor:
    """(B, N) the ranked scores: the method's `scores` (B, N) times the prior's weight of each token's grid
    position (when the stage `reweight`s) and its padding weight (`not_padding`, when suppressed)."""
    if not reweight:
        return scores
    weights = prior.weights(  # (B, N)
        layout.row, layout.col, layout.grid_h, layout.grid_w, layout.frames, layout.frame_counts
    )
    if not_padding is not None:
        weights = weights * not_padding
    return scores * weights.to(scores.device)


def stage_budgets(stage: PruningStage, prunable: torch.Tensor) -> torch.Tensor:
    """(B,) long: tokens `stage` keeps of an image with `prunable` (B,) prunable tokens (0 for none)."""
    return torch.tensor(
        [stage.budget(int(n)) if int(n) > 0 else 0 for n in prunable.tolist()], device=prunable.device
    )


def check_budgets(
    stages: Sequence[PruningStage], stage: int, budget: torch.Tensor, limit: torch.Tensor
) -> None:
    """A stage may not keep more of an image (`budget`, (B,)) than it has left (`limit`, (B,))."""
    if not bool((budget > limit).any()):
        return
    largest, settings = int(limit.max()), stages[stage]
    if stage == 0:
        raise ValueError(
            f"strategy.keep={settings.keep} is larger than the {largest} prunable image tokens of an image; "
            f"use keep <= {largest}, or strategy.ratio for a share of each image"
        )
    raise ValueError(
        f"pruning stage {stage} (before layer {settings.layer}) would keep {int(budget.max())} tokens of "
        f"an image that has {largest} left after the previous stage; budgets must not grow from stage to "
        f"stage"
    )


def top_k(ranked: torch.Tensor, among: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the `budget` (B,) highest of `ranked` (B, N) among the tokens `among` (B, N), ties to the
    earlier token."""
    slot = torch.arange(ranked.shape[1], device=ranked.device)
    ranked = torch.where(among, ranked, torch.full_like(ranked, float("-inf")))
    # A stable descending sort breaks ties towards the earlier token, so the choice is reproducible.
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N)
    rank = torch.empty_like(order).scatter_(1, order, slot.expand_as(order))
    return among & (rank < budget[:, None])


def select(
    stages: Sequence[PruningStage],
    stage: int,
    weighted: torch.Tensor,
    layout: VisualLayout,
    candidates: torch.Tensor,
    unpadded: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) bool: the visual tokens that survive `stage`: the never-prunable ones, and the top budget of
    each image's `candidates` (B, N) by `weighted` (B, N).

    `unpadded` (B, N) bool (the PoRe authors' FastV): only those tokens compete, so an image with fewer of
    them than the budget keeps fewer, at every stage (a later stage never asks for the padding dropped here).
    """
    settings = stages[stage]
    prunable = layout.valid & layout.prunable  # (B, N)
    kept = layout.valid & ~layout.prunable  # never-prunable tokens stay
    images = int(layout.images_per_sample.max()) if weighted.numel() else 0
    for image in range(images):
        of_image = layout.image_index == image  # (B, N)
        in_image = candidates & of_image
        count = in_image.sum(dim=1)  # (B,)
        original = (prunable & of_image).sum(dim=1)  # (B,)
        if int(count.max()) == 0:
            continue
        budget = stage_budgets(settings, original).to(weighted.device)
        limit = count
        if unpadded is not None and stage > 0:  # the cut may have left fewer tokens: check the budgets' order
            limit = stage_budgets(stages[stage - 1], original).to(weighted.device)
        check_budgets(stages, stage, budget, limit)
        if unpadded is not None:  # rank the unpadded only: fewer of them than the budget cuts the budget
            in_image = candidates & unpadded & of_image
        kept |= top_k(weighted, in_image, budget)
    return kept
