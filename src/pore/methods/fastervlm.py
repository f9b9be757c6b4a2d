"""FasterVLM (Zhang et al., 2024): rank image tokens by the vision encoder's [CLS] attention.

The [CLS] query of the encoder layer that produces the LLM's image features attends to every patch; its
attention (mean over heads) says which patches the encoder found important. No language-model attention is
involved, so there is no recency bias to correct: the control that tells how much of PoRe's gain is the bias.
The predefined strategy prunes before the language model (K = 0), as published; `strategy.layer=2` compares
it with FastV at the same cost.
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs


@METHODS.register("fastervlm")
class FasterVLM(PruningMethod):
    official_positions = "compact"  # the official code removes the tokens (docs/methods.md)
    vision_attention = True

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        assert inputs.vision_attention is not None
        return inputs.vision_attention.double()  # (B, N)
