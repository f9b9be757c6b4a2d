"""PyramidDrop (Xing et al., CVPR 2025): prune in stages, each ranked by the last instruction token.

The model is split into stages (by default before layers 8, 16 and 24 of 32, keeping 50 / 25 / 12.5 % of
each image's tokens); at each stage the image tokens that are left are ranked by the attention the last
prompt token pays them, and only the top ones go on. The stages come from the strategy
(`strategy.layer=[8,16,24] strategy.ratio=[0.5,0.25,0.125]`); the prior reweights every stage, or only the
first with `strategy.reweight=first`.

Where the attention comes from (`strategy.options.score_from`):

- `own_layer` (default, the official code): at the start of layer K, layer K's own input norm and q / k
  projections (with RoPE at the current positions) are applied to layer K's input, and the last prompt
  token's query attends over the current sequence (softmax under the causal and padding mask, mean over
  heads). The engine runs layer K's attention module once more on the normed input, without the cache.
- `previous_layer`: the attention the last prompt token pays in layer K-1 (as FastV), which costs nothing
  extra.

The official code also removes the dropped tokens, so the kept sequence is renumbered 0..L'-1 after each
stage (`strategy.positions=official` = `compact`).
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.methods.requests import LastTokenAttention, Request

SCORE_FROM = ("own_layer", "previous_layer")


@METHODS.register("pdrop")
class PyramidDrop(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens (docs/methods.md)
    requests = (LastTokenAttention(),)

    def __init__(self, seed: int = 0, score_from: str = "own_layer") -> None:
        super().__init__(seed)
        if score_from not in SCORE_FROM:
            raise ValueError(
                f"pdrop: unknown options.score_from {score_from!r}; valid values: {', '.join(SCORE_FROM)}"
            )
        self.own_layer = score_from == "own_layer"

    def observations(self) -> tuple[Request, ...]:
        return (LastTokenAttention(own_layer=self.own_layer),)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.last_token_attention is not None
        return inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()  # (B, N)
