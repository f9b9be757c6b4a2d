"""Pruning methods: how each image token is scored before the prior and the per-image top-k.

A method is a small class that turns what the engine observed at a pruning point into one score per visual
token (higher = more worth keeping). The engine multiplies the scores by the prior's weights and keeps the
top `keep` of each image; methods never deal with masks, caches or gathering. A method says what it needs
to look at as observation requests (`pore.methods.requests`), so the engine only pays for what is used:

- `requests = (LastTokenAttention(),)`: the attention the last prompt token pays every position in layer K-1
  (FastV, PyramidDrop);
- `requests = (TextAttention(),)`: the attention every text token pays every position in layer K-1
  (SparseVLM's raters);
- `requests = (VisionAttention(),)`: the vision encoder's [CLS] attention to its patches (FasterVLM);
- and the vision tower's hidden states, attention or keys of any encoder layer, the projected image
  embeddings, the text embeddings, any earlier decoder layer's hidden states or keys: see
  `pore.methods.requests` for what each delivers and in what shape.

Requests that depend on the method's options come from `observations()`. The older class attributes
(`attention_queries`, `vision_attention`, `scores_in_own_layer`, `needs_input_embeddings`) still work: they
are shorthands that `observations()` turns into the same requests.

After the engine's per-image top-k, a method may change which tokens stay and what they carry (`recycle`):
average pooling, merging, recycled cluster centres; by default the kept tokens pass through unchanged.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from pore.adapters.base import VisualLayout
from pore.methods.requests import (
    LastTokenAttention,
    PromptEmbeddings,
    Request,
    TextAttention,
    VisionAttention,
)
from pore.registry import Registry


@dataclass
class ScoringInputs:
    """What a method may look at when the engine prunes before a layer.

    Sequence positions refer to the sequence as it enters the pruning layer: at a later stage of a
    multi-stage strategy, `layout.seq_index` points into the already shortened sequence and `alive` marks
    the visual tokens that earlier stages kept. What the method requested is `inputs[request]`
    (`pore.methods.requests` says the shape of each); the named fields below hold the first requests under
    their older names.
    """

    layout: VisualLayout
    alive: torch.Tensor  # (B, N) bool: visual tokens still in the sequence (all valid ones at stage 0)
    input_ids: torch.Tensor  # (B, L) the prompt tokens (original, unpruned)
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding (original, unpruned)
    budget: Callable[[int], int]  # tokens to keep of an image, from its number of prunable tokens
    stage: int = 0  # index of the pruning stage
    # (B, L_cur) attention of the last prompt token over the current sequence in layer K-1, mean over heads
    # (`LastTokenAttention`).
    last_token_attention: torch.Tensor | None = None
    # (B, Q, L_cur) attention of the text tokens at `text_positions` over the current sequence in layer K-1
    # (`TextAttention`).
    text_attention: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None  # (B, Q) bool: real text query (not padding of the Q axis)
    # (B, N) float64 the vision encoder's [CLS] attention to each visual token's patch (0 for tokens without
    # one; `VisionAttention()`).
    vision_attention: torch.Tensor | None = None
    # (B, N) long: the encoder view of its image each token came from (LLaVA-NeXT: 0 base, 1.. tiles; -1
    # none); None for families with one view per image. Filled for methods with a vision request.
    vision_views: torch.Tensor | None = None
    # (B, Q) long: where the text queries of `text_attention` sit in the current sequence.
    text_positions: torch.Tensor | None = None
    # (B, L_cur) long: position in the prompt of each slot of the current sequence.
    origin: torch.Tensor | None = None
    # (B, N) long: where each visual token sat in the prompt (`layout.seq_index` before any pruning).
    prompt_seq_index: torch.Tensor | None = None
    # (B, L, D) the language model's input embeddings of the prompt (`PromptEmbeddings`).
    input_embeddings: torch.Tensor | None = None
    # Everything the method requested, by request.
    observations: Mapping[Request, Any] = field(default_factory=dict)
    # (B, N) the method's own scores at this stage, before the prior's weights and padding suppression: set by
    # the engine after `score`, for a `recycle` that ranks by them (SparseVLM's official recycling).
    method_scores: torch.Tensor | None = None
    # Each sample's instruction text (`Pruner.set_texts`; the pipeline hands the questions), or None when
    # nobody set them: for instruction-conditioned methods (CDPruner).
    texts: list[str] | None = None

    def __getitem__(self, request: Request) -> Any:
        """What `request` observed for this stage (its docstring gives the shape)."""
        if request not in self.observations:
            raise KeyError(
                f"{request} was not observed: add it to the method's `requests` (or `observations()`)"
            )
        return self.observations[request]

    def candidates(self) -> torch.Tensor:
        """(B, N) bool: the visual tokens this stage may drop."""
        return self.layout.valid & self.layout.prunable & self.alive


class PruningMethod(ABC):
    """Scores visual tokens; registered by name in `METHODS`.

    Keyword arguments of `__init__` besides `seed` are the method's options (`strategy.options.<name>`).
    """

    #: what the engine must capture for `score` and `recycle` (`pore.methods.requests`)
    requests: ClassVar[tuple[Request, ...]] = ()
    #: whether the method drops anything at all (`none` does not, and leaves the model untouched)
    prunes: ClassVar[bool] = True
    #: whether the choice depends on `seed` (a random draw): such a strategy is reported over several
    #: seeds (`seeds=[0,1,2]`, docs/statistics.md); a deterministic one runs once
    stochastic: ClassVar[bool] = False
    #: the RoPE positions the method's official code gives the kept tokens (`strategy.positions=official`):
    #: "original" (masking: FastV) or "compact" (the tokens are removed: 0..L'-1, decoding continues from L')
    official_positions: ClassVar[Literal["original", "compact"]] = "original"
    #: which half of a prior (PoRe) the method takes, checked by `Strategy.resolve`: "any" (scored by the
    #: language model's attention: position weights and padding suppression), "suppression" (scored by the
    #: vision tower's [CLS] attention: only the padding / sink suppression of PoRe v2), "none" (similarity or
    #: diversity scores: no prior at all)
    prior_use: ClassVar[Literal["any", "suppression", "none"]] = "any"
    #: the most pruning stages the method has a rule for (None: any number), checked by `Strategy.resolve`
    max_stages: ClassVar[int | None] = None

    # Shorthands for the first requests, kept for methods written with them (`observations()` maps them):
    #: "last" = `LastTokenAttention()`, "text" = `TextAttention()`
    attention_queries: ClassVar[Literal["last", "text"] | None] = None
    #: True = `VisionAttention()`
    vision_attention: ClassVar[bool] = False
    #: with `attention_queries`: the rows come from layer K itself (`own_layer=True`); set per instance
    scores_in_own_layer: bool = False
    #: True = `PromptEmbeddings()`; set per instance
    needs_input_embeddings: bool = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def observations(self) -> tuple[Request, ...]:
        """Every request of this instance: `requests`, plus what the shorthands ask for. Methods whose
        requests depend on their options override it."""
        shorthands: list[Request] = []
        if self.attention_queries is not None:
            kind = LastTokenAttention if self.attention_queries == "last" else TextAttention
            shorthands.append(kind(own_layer=self.scores_in_own_layer))
        if self.vision_attention:
            shorthands.append(VisionAttention())
        if self.needs_input_embeddings:
            shorthands.append(PromptEmbeddings())
        return tuple(dict.fromkeys((*self.requests, *shorthands)))

    @classmethod
    def lowest_layer(cls) -> int:
        """The smallest pruning layer K its class-level requests allow (1 when it reads layer K-1)."""
        requests = list(cls.requests)
        if cls.attention_queries is not None:
            requests.append(LastTokenAttention())
        return max((request.lowest_layer for request in requests), default=0)

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
        """(hidden states, kept) after the engine's per-image top-k; default: `merge` only.

        hidden: (B, L_cur, D) what layer K receives, the current sequence (visual token n of sample b sits at
        `inputs.layout.seq_index[b, n]`); kept: (B, N) bool, the engine's choice; scores: (B, N) the ranked
        scores (method score x prior). The engine then keeps every non-visual token and the visual tokens the
        returned `kept` marks, with the returned hidden states, each at its slot's RoPE position. So a method
        may:

        - rewrite what kept tokens carry (average pooling, merging dropped tokens into kept ones);
        - keep more tokens, or other ones, than the top-k (SparseVLM's recycled cluster centres, FasterVLM's
          per-view budgets);
        - put new tokens into the slots of dropped ones: write the new hidden state at a dropped token's
          slot and mark it kept (VisionZip's merged contextual tokens take the places of tokens it drops).

        Only visual tokens still in the sequence (`inputs.alive`) can be kept.
        """
        return self.merge(inputs, hidden, kept), kept


METHODS: Registry[type[PruningMethod]] = Registry("pruning method")
