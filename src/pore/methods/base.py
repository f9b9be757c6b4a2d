"""Pruning methods: how each image token is scored before the prior and the per-image top-k.

A method is a small class that turns what the engine observed at the pruning point into one score per visual
token (higher = more worth keeping). The engine multiplies the scores by the prior's weights and keeps the
top `keep` tokens of each image; methods never deal with masks, caches or gathering.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from pore.adapters.base import VisualLayout
from pore.registry import Registry


@dataclass
class ScoringInputs:
    """What a method may look at when the engine prunes before layer K."""

    layout: VisualLayout
    input_ids: torch.Tensor  # (B, L) the prompt tokens
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding
    # (B, L) attention that the last prompt token pays every position in layer K-1, mean over heads;
    # present only for methods with `needs_attention = True`.
    last_token_attention: torch.Tensor | None = None


class PruningMethod(ABC):
    """Scores visual tokens; registered by name in `METHODS`."""

    #: whether the engine must capture layer K-1's last-token attention for this method
    needs_attention: ClassVar[bool] = False
    #: whether the method drops anything at all (`none` does not, and leaves the model untouched)
    prunes: ClassVar[bool] = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """(B, N) float scores, one per visual token of `inputs.layout` (padding slots are ignored)."""


METHODS: Registry[type[PruningMethod]] = Registry("pruning method")
