"""No pruning: the unpruned baseline. The engine attaches nothing, so the model runs untouched."""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs


@METHODS.register("none")
class NoPruning(PruningMethod):
    prunes = False

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        return torch.ones(inputs.layout.seq_index.shape, dtype=torch.float64, device=inputs.input_ids.device)
