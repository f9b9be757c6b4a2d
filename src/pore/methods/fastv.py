"""FastV (Chen et al., ECCV 2024): rank image tokens by the attention the last prompt token pays them.

The attention comes from layer K-1, averaged over heads; the engine captures it from the query and key
states inside the attention call, so the model keeps running with SDPA or FlashAttention.

When to rank (`strategy.options.rerank`):

- `prefill` (default): once, at the prompt; the dropped tokens are removed from layers K and later (FastV's
  in-place implementation, `fast_v_inplace`, and most re-implementations);
- `every_token`: FastV's official mask implementation (modeling_llama.py, `elif USE_FAST_V`, which its
  evaluation scripts and the PoRe authors' runs use, with the KV cache): every token stays, and at the prompt
  and at every generated token the last token's attention in layer K-1 re-selects the image tokens that
  layers K and later may attend to (`pore.engine.rerank`).
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import LastTokenAttention

RERANK = ("prefill", "every_token")


@METHODS.register("fastv")
class FastV(PruningMethod):
    requests = (LastTokenAttention(),)

    def __init__(self, seed: int = 0, rerank: str = "prefill") -> None:
        super().__init__(seed)
        if rerank not in RERANK:
            raise ValueError(f"fastv: unknown options.rerank {rerank!r}; valid values: {', '.join(RERANK)}")
        self.rerank = rerank

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.last_token_attention is not None
        return inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()  # (B, N)
