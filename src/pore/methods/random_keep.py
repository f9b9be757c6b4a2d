"""Random keep: the same budget as the other methods, chosen uniformly at random.

The draw is seeded by the strategy's seed and by the sample's own (unpadded) tokens, so a sample keeps the
same tokens whether it runs alone or in any batch, and every run of the same data keeps the same tokens.
"""

from __future__ import annotations

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs

_HASH_MODULUS = 2_147_483_647  # a Mersenne prime: the token hash stays inside int64 arithmetic


def sample_seed(seed: int, token_ids: torch.Tensor) -> int:
    """A deterministic 31-bit seed from `seed` and a 1-D tensor of token ids."""
    ids = token_ids.long().cpu() % _HASH_MODULUS
    weights = torch.arange(1, ids.numel() + 1, dtype=torch.long) * 1_000_003 % _HASH_MODULUS
    return int((seed * 7919 + (ids * weights % _HASH_MODULUS).sum()) % _HASH_MODULUS)


@METHODS.register("random")
class RandomKeep(PruningMethod):
    stochastic = True  # another strategy.seed, another draw

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        layout = inputs.layout
        scores = torch.empty(layout.seq_index.shape, dtype=torch.float64)
        for b in range(scores.shape[0]):
            own_tokens = inputs.input_ids[b][inputs.attention_mask[b].bool()]
            generator = torch.Generator().manual_seed(sample_seed(self.seed, own_tokens))
            scores[b] = torch.rand(scores.shape[1], generator=generator, dtype=torch.float64)
        return scores.to(layout.seq_index.device)
