"""Pruning methods: how each image token is scored before the prior and the per-image top-k.

A method is a small class that turns what the engine observed at a pruning point into one score per visual
token (higher = more worth keeping). The engine multiplies the scores by the prior's weights and keeps the
top `keep` of each image; methods never deal with masks, caches or gathering. A method says what it needs
to look at through class attributes, so the engine only pays for what is used:

- `attention_queries = "last"`: the attention the last prompt token pays every position in layer K-1
  (FastV, PyramidDrop);
- `attention_queries = "text"`: the attention every text token pays every position in layer K-1
  (SparseVLM's raters);
- `vision_attention = True`: the vision encoder's [CLS] attention to its patches (FasterVLM).

A method may also rewrite the hidden states of the tokens it keeps (`merge`: average pooling, token
recycling); by default the kept tokens pass through unchanged.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from pore.adapters.base import VisualLayout
from pore.registry import Registry


@dataclass
class ScoringInputs:
    """What a method may look at when the engine prunes before a layer.

    Sequence positions refer to the sequence as it enters the pruning layer: at a later stage of a
    multi-stage strategy, `layout.seq_index` points into the already shortened sequence and `alive` marks
    the visual tokens that earlier stages kept.
    """

    layout: VisualLayout
    alive: torch.Tensor  # (B, N) bool: visual tokens still in the sequence (all valid ones at stage 0)
    input_ids: torch.Tensor  # (B, L) the prompt tokens (original, unpruned)
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding (original, unpruned)
    budget: Callable[[int], int]  # tokens to keep of an image, from its number of prunable tokens
    stage: int = 0  # index of the pruning stage
    # (B, L_cur) attention of the last prompt token over the current sequence in layer K-1, mean over heads.
    last_token_attention: torch.Tensor | None = None
    # (B, Q, L_cur) attention of the text tokens at `text_positions` over the current sequence in layer K-1.
    text_attention: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None  # (B, Q) bool: real text query (not padding of the Q axis)
    # (B, N) the vision encoder's [CLS] attention to each visual token's patch (0 for tokens without one).
    vision_attention: torch.Tensor | None = None
    # (B, N) long: the encoder view of its image each token came from (LLaVA-NeXT: 0 base, 1.. tiles; -1
    # none); None for families with one view per image. Filled for methods with `vision_attention`.
    vision_views: torch.Tensor | None = None
    # (B, Q) long: where the text queries of `text_attention` sit in the current sequence.
    text_positions: torch.Tensor | None = None
    # (B, L_cur) long: position in the prompt of each slot of the current sequence.
    origin: torch.Tensor | None = None
    # (B, N) long: where each visual token sat in the prompt (`layout.seq_index` before any pruning).
    prompt_seq_index: torch.Tensor | None = None
    # (B, L, D) the language model's input embeddings of the prompt (methods with `needs_input_embeddings`).
    input_embeddings: torch.Tensor | None = None

    def candidates(self) -> torch.Tensor:
        """(B, N) bool: the visual tokens this stage may drop."""
        return self.layout.valid & self.layout.prunable & self.alive


class PruningMethod(ABC):
    """Scores visual tokens; registered by name in `METHODS`.

    Keyword arguments of `__init__` besides `seed` are the method's options (`strategy.options.<name>`).
    """

    #: which attention rows of layer K-1 the engine must capture (None: none)
    attention_queries: ClassVar[Literal["last", "text"] | None] = None
    #: whether the engine must capture the vision encoder's [CLS] attention
    vision_attention: ClassVar[bool] = False
    #: whether the method drops anything at all (`none` does not, and leaves the model untouched)
    prunes: ClassVar[bool] = True
    #: whether the choice depends on `seed` (a random draw): such a strategy is reported over several
    #: seeds (`seeds=[0,1,2]`, docs/statistics.md); a deterministic one runs once
    stochastic: ClassVar[bool] = False
    #: the RoPE positions the method's official code gives the kept tokens (`strategy.positions=official`):
    #: "original" (masking: FastV) or "compact" (the tokens are removed: 0..L'-1, decoding continues from L')
    official_positions: ClassVar[Literal["original", "compact"]] = "original"
    #: whether the attention rows come from layer K itself (its input norm + q/k projections applied to its
    #: input, PyramidDrop's official scoring) instead of layer K-1's attention; set per instance
    scores_in_own_layer: bool = False
    #: whether the engine must keep the prompt's input embeddings for `score` (set per instance)
    needs_input_embeddings: bool = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @property
    def needs_attention(self) -> bool:
        """Whether the engine must watch layer K-1's attention."""
        return self.attention_queries is not None

    @classmethod
    def option_names(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters
        return [name for name in parameters if name not in ("self", "seed")]

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Unknown option names are an error that lists the valid ones."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            valid = ", ".join(cls.option_names()) or "none"
            raise ValueError(f"unknown strategy.options {unknown} for this method; valid options: {valid}")

    @abstractmethod
    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """(B, N) float scores, one per visual token of `inputs.layout` (non-candidates are ignored)."""

    def merge(self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L_cur, D) to gather the kept tokens from; `kept` (B, N) bool. Default: as is."""
        return hidden

    def recycle(
        self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, kept) after the engine's per-image top-k: a method may change which tokens stay
        (SparseVLM keeps cluster centres of the dropped tokens, FasterVLM splits an image's budget between
        its views) and their hidden states; `scores` (B, N) are the ranked scores. Default: `merge` only."""
        return self.merge(inputs, hidden, kept), kept


METHODS: Registry[type[PruningMethod]] = Registry("pruning method")
