"""FastV (Chen et al., ECCV 2024): rank image tokens by the attention the last prompt token pays them.

The attention comes from layer K-1, averaged over heads; the engine captures it from the query and key
states inside the attention call, so the model keeps running with SDPA or FlashAttention.
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import LastTokenAttention


@METHODS.register("fastv")
class FastV(PruningMethod):
    requests = (LastTokenAttention(),)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.last_token_attention is not None
        return inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()  # (B, N)
