"""PyramidDrop (Xing et al., CVPR 2025): prune in stages, each ranked by the last instruction token.

The model is split into stages (by default before layers 8, 16 and 24 of 32, keeping 50 / 25 / 12.5 % of
each image's tokens); at each stage the image tokens that are left are ranked by the attention the last
prompt token pays them in the layer just before, and only the top ones go on. The stages come from the
strategy (`strategy.layer=[8,16,24] strategy.ratio=[0.5,0.25,0.125]`); the prior reweights every stage,
or only the first with `strategy.reweight=first`.
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs


@METHODS.register("pdrop")
class PyramidDrop(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens (docs/methods.md)
    attention_queries = "last"

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.last_token_attention is not None
        return inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()  # (B, N)
