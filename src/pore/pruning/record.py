"""What one pruned prefill did: visual tokens and sequence length per layer, and which tokens it kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pore.adapters.base import VisualLayout


@dataclass
class PruningRecord:
    """Filled by the engine at every prefill; read it from `Pruner.last_record` after `generate()`."""

    layer: int  # pruning happened before this decoder layer
    layout: VisualLayout  # the visual tokens of the prompt batch
    kept: torch.Tensor  # (B, N) bool: visual token kept from `layer` on
    scores: torch.Tensor  # (B, N) float64: method score times prior weight (what the top-k ranked)
    visual_tokens: torch.Tensor  # (num_layers, B) long: visual tokens each decoder layer processes
    sequence_lengths: torch.Tensor  # (num_layers, B) long: real (non-padding) tokens each layer processes
    _kept_raster: list[list[list[int]]] | None = field(default=None, repr=False)

    @property
    def kept_raster(self) -> list[list[list[int]]]:
        """Per sample, per image: sorted raster indices (row * W + col) of the grid tokens kept."""
        if self._kept_raster is None:
            layout = self.layout
            kept = (self.kept & layout.valid & layout.prunable).cpu()
            image, raster = layout.image_index.cpu(), layout.raster.cpu()
            in_grid = (layout.valid & layout.prunable).cpu()
            result = []
            for b in range(kept.shape[0]):
                images = int(image[b][in_grid[b]].max()) + 1 if bool(in_grid[b].any()) else 0
                result.append([sorted(raster[b][kept[b] & (image[b] == i)].tolist()) for i in range(images)])
            self._kept_raster = result
        return self._kept_raster

    @property
    def visual_tokens_before(self) -> torch.Tensor:
        """(B,) visual tokens each sample had before pruning."""
        return self.visual_tokens[0]

    @property
    def visual_tokens_after(self) -> torch.Tensor:
        """(B,) visual tokens each sample kept from the pruning layer on."""
        return self.visual_tokens[self.layer]
