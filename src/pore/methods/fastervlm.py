"""FasterVLM (Zhang et al., 2024): rank image tokens by the vision encoder's [CLS] attention.

The [CLS] query of the encoder layer that produces the LLM's image features attends to every patch; its
attention (mean over heads) says which patches the encoder found important. No language-model attention is
involved, so there is no recency bias to correct: the control that tells how much of PoRe's gain is the bias.
The predefined strategy prunes before the language model (K = 0), as published, and so the kept tokens are
renumbered 0..L'-1 (`positions=official` = `compact`); `strategy.layer=2` compares it with FastV at the same
cost.

Images encoded as several views (LLaVA-NeXT: the base image and each high-resolution tile, each with its own
[CLS] row), `strategy.options.budget`:

- `per_view` (default, the official code): the image's budget is split equally between its views, each
  keeping its own top tokens (the official code keeps the same top-T of each view's S x S patches; here a
  view that has fewer tokens than its share after unpadding hands the rest to the other views, so the image
  keeps exactly its budget);
- `joint`: one top-k over all of the image's tokens, whatever view they come from.

Families with one view per image (LLaVA-1.5) are unaffected.
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import VisionAttention

BUDGETS = ("per_view", "joint")


def view_quotas(budget: int, sizes: list[int]) -> list[int]:
    """Split `budget` equally between views of `sizes` tokens, earlier views first for the remainder; a view
    never gets more than it has, and what it cannot take goes to the others."""
    quotas = [0] * len(sizes)
    remaining = min(budget, sum(sizes))
    open_views = [i for i, size in enumerate(sizes) if size > 0]
    while remaining > 0 and open_views:
        share, extra = divmod(remaining, len(open_views))
        for rank, i in enumerate(open_views):
            take = min(share + (rank < extra), sizes[i] - quotas[i])
            quotas[i] += take
            remaining -= take
        open_views = [i for i in open_views if quotas[i] < sizes[i]]
    return quotas


@METHODS.register("fastervlm")
class FasterVLM(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens (docs/methods.md)
    requests = (VisionAttention(),)  # the [CLS] row of the encoder layer behind the features

    def __init__(self, seed: int = 0, budget: str = "per_view") -> None:
        super().__init__(seed)
        if budget not in BUDGETS:
            raise ValueError(
                f"fastervlm: unknown options.budget {budget!r}; valid values: {', '.join(BUDGETS)}"
            )
        self.per_view = budget == "per_view"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.vision_attention is not None
        return inputs.vision_attention.double()  # (B, N)

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """per_view: replace the engine's per-image top-k by a top-k inside each view, the image's budget (as
        many tokens as the engine kept of it) split equally between the views."""
        views = inputs.vision_views
        if not self.per_view or views is None:
            return hidden, kept
        layout = inputs.layout
        candidates = inputs.candidates()  # (B, N)
        chosen = kept & ~candidates  # tokens this stage may not drop stay
        for b in range(kept.shape[0]):
            for image in layout.image_index[b][candidates[b]].unique().tolist():
                in_image = candidates[b] & (layout.image_index[b] == image)  # (N,)
                budget = int((kept[b] & in_image).sum())
                view_ids = views[b][in_image].unique().tolist()
                sizes = [int((in_image & (views[b] == v)).sum()) for v in view_ids]
                for view, quota in zip(view_ids, view_quotas(budget, sizes), strict=True):
                    slots = (in_image & (views[b] == view)).nonzero()[:, 0]
                    # Highest score first, ties to the earlier token (as the engine's top-k).
                    order = torch.sort(scores[b, slots], descending=True, stable=True).indices[:quota]
                    chosen[b, slots[order]] = True
        return hidden, chosen
