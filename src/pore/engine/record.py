"""What one pruned prefill did: visual tokens and sequence length per layer, and which tokens it kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pore.adapters.base import VisualLayout


@dataclass
class PruningRecord:
    """Filled by the engine at every prefill; read it from `Pruner.last_record` after `generate()`."""

    layer: int  # the first pruning happened before this decoder layer
    layout: VisualLayout  # the visual tokens of the prompt batch
    kept: torch.Tensor  # (B, N) bool: visual tokens that reach the last layer (kept by every stage)
    scores: torch.Tensor  # (B, N) float64: the first stage's method score times prior weight (ranked)
    visual_tokens: torch.Tensor  # (num_layers, B) long: visual tokens each decoder layer processes
    sequence_lengths: torch.Tensor  # (num_layers, B) long: real (non-padding) tokens each layer processes
    stage_layers: list[int] = field(default_factory=list)  # per pruning stage: the layer it pruned before
    stage_kept: list[torch.Tensor] = field(default_factory=list)  # per stage (B, N) bool: kept from there on
    stage_scores: list[torch.Tensor] = field(default_factory=list)  # per stage (B, N) float64: ranked scores
    _kept_raster: list[list[list[int]]] | None = field(default=None, repr=False)

    @classmethod
    def from_stages(
        cls,
        layout: VisualLayout,
        padding_mask: torch.Tensor,
        num_layers: int,
        stage_layers: list[int],
        stage_kept: list[torch.Tensor],
        stage_scores: list[torch.Tensor],
    ) -> PruningRecord:
        """The record of a prefill whose stages (before `stage_layers`) kept `stage_kept` (each (B, N) bool)
        of the prompt's visual tokens `layout`; `padding_mask` (B, L) its real tokens."""
        visual_before = layout.valid.sum(dim=1)  # (B,)
        real_before = padding_mask.sum(dim=1)
        visual = visual_before.expand(num_layers, -1).clone()  # (layers, B)
        for layer, kept in zip(stage_layers, stage_kept, strict=True):
            visual[layer:] = (layout.valid & kept).sum(dim=1)
        return cls(
            layer=stage_layers[0],
            layout=layout,
            kept=stage_kept[-1],
            scores=stage_scores[0],
            visual_tokens=visual,
            sequence_lengths=real_before - (visual_before - visual),
            stage_layers=list(stage_layers),
            stage_kept=list(stage_kept),
            stage_scores=list(stage_scores),
        )

    @property
    def kept_raster(self) -> list[list[list[int]]]:
        """Per sample, per image: sorted indices of the grid tokens kept, counted among the image's prunable
        tokens in sequence order.

        For a single raster-ordered grid (LLaVA-1.5, Qwen2-VL) this is the raster index row * W + col; for
        images made of several grids (LLaVA-NeXT: base image, then the high-resolution grid without its
        row separators) it counts through the grids in the order the model reads them.
        """
        if self._kept_raster is None:
            layout = self.layout
            in_grid = (layout.valid & layout.prunable).cpu()  # (B, N)
            kept = (self.kept.cpu() & in_grid).tolist()
            image = layout.image_index.cpu().tolist()
            in_grid = in_grid.tolist()
            result = []
            for b in range(len(kept)):
                per_image: dict[int, list[int]] = {}
                ordinal: dict[int, int] = {}
                for n, is_grid in enumerate(in_grid[b]):  # slots are in sequence order
                    if not is_grid:
                        continue
                    i = image[b][n]
                    index = ordinal.get(i, 0)
                    ordinal[i] = index + 1
                    chosen = per_image.setdefault(i, [])
                    if kept[b][n]:
                        chosen.append(index)
                result.append([per_image.get(i, []) for i in range(max(per_image, default=-1) + 1)])
            self._kept_raster = result
        return self._kept_raster

    @property
    def visual_tokens_before(self) -> torch.Tensor:
        """(B,) visual tokens each sample had before pruning."""
        return self.visual_tokens[0]

    @property
    def visual_tokens_after(self) -> torch.Tensor:
        """(B,) visual tokens each sample kept to the last layer."""
        return self.visual_tokens[-1]
