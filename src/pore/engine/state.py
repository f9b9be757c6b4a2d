"""What the pruner's hooks hand each other: one object per thing that flows from hook to hook.

transformers calls the hooks one after the other inside a forward; what one hook learns, a later one needs.
Each object below is created by one hook and consumed (or dropped) by a later one, so nothing leaks from one
forward into the next (`pore.engine.pruner` lists who reads and writes what):

- `IncomingCall`: what the multimodal wrapper was called with, and what the vision tower showed, for the
  language model's hook (the vision tower may run before the wrapper: generate() encodes images first);
- `LanguageForward`: one forward of the language model: a `Prefill` (a fresh prompt) or a decoding step,
  and the inputs the pruned layers get (`PrunedLayerInputs`);
- `Prefill`: the prompt as the stages shorten it, and what the method observed for the next stage;
- `PrunedPrompt`: how the stages shortened the prompt, kept for the decoding steps that follow it.

`HookState` holds the current one of each; the pruner and its observer share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from pore.adapters import LayerFeatures, VisualLayout
from pore.engine.rerank import RerankState
from pore.methods.requests import Request


@dataclass
class PromptFeatures:
    """One prompt's layer features (DeepStack), with the feature row of each prompt position
    (`pore.engine.layer_features` adds them to the tokens that survive pruning)."""

    features: list[torch.Tensor]  # per decoder layer: (M, D)
    row: torch.Tensor  # (B, L) long: the feature row of each prompt position, -1 where it receives none

    @classmethod
    def of(cls, given: LayerFeatures) -> PromptFeatures:
        mask = given.mask.bool()  # (B, L)
        rank = torch.cumsum(mask.flatten().long(), dim=0).view(mask.shape) - 1  # batch-major order
        return cls(list(given.features), torch.where(mask, rank, -1))


@dataclass
class IncomingCall:
    """What reached the model before its language model ran; consumed by the language model's hook."""

    input_ids: torch.Tensor | None = None  # (B, L) as the multimodal wrapper received them
    image_inputs: Mapping[str, Any] = field(default_factory=dict)  # its other arguments (image_sizes, ...)
    # The vision tower's captures per capture key: (views, L_v, ...) tensors, every view of the batch.
    vision: dict[Any, torch.Tensor] = field(default_factory=dict)


@dataclass
class Prefill:
    """State of one forward over a fresh prompt, updated by each pruning stage."""

    input_ids: torch.Tensor  # (B, L) the prompt
    padding_mask: torch.Tensor  # (B, L) bool, True = real token
    layout: VisualLayout  # (B, N) the prompt's visual tokens, positions in the unpruned sequence
    alive: torch.Tensor  # (B, N) bool: visual tokens still in the sequence
    position: torch.Tensor  # (B, N) long: where each alive visual token sits in the current sequence
    origin: torch.Tensor  # (B, L_cur) long: position in the prompt of each slot of the current sequence
    current_padding: torch.Tensor  # (B, L_cur) bool: real tokens of the current sequence
    # What the method asked to see that does not change from stage to stage (vision tower, embeddings),
    # already per visual token; filled by the language model's hook.
    prompt_observations: dict[Request, Any] = field(default_factory=dict)
    vision_views: torch.Tensor | None = None  # (B, N) long: each token's encoder view of its image, or None
    # What the method asked to see of the decoder for the next stage, per capture (current sequence);
    # filled by the observer's hooks and cleared by each stage.
    stage_captures: dict[Any, Any] = field(default_factory=dict)
    # (B, L_cur) long: RoPE positions of the current sequence (kept only for strategy.positions=compact)
    current_positions: torch.Tensor | None = None
    # (B, L_cur) long: the bidirectional block of each slot of the current sequence (tokens of one image share
    # an id >= 0, -1 elsewhere: Gemma 3's image tokens attend to each other), or None (causal only)
    block_ids: torch.Tensor | None = None
    stage: int = 0  # the next stage to run
    stage_kept: list[torch.Tensor] = field(default_factory=list)  # per stage (B, N) bool
    stage_scores: list[torch.Tensor] = field(default_factory=list)  # per stage (B, N) float64

    @property
    def current_layout(self) -> VisualLayout:
        """The layout with `seq_index` pointing into the current (shortened) sequence."""
        return VisualLayout(**{**vars(self.layout), "seq_index": self.position})


@dataclass
class PrunedLayerInputs:
    """What every decoder layer after a pruning point receives instead of the language model's arguments,
    per kind of layer (`config.layer_types`: `full_attention`, `sliding_attention`; one kind for most models),
    as the language model hands each layer the mask and RoPE of its kind."""

    # layer kind -> mask in the backend's own format (None, 4-D bool / float, or 2-D)
    attention_mask: dict[str, Any]
    # layer kind -> (cos, sin) of the kept tokens; None = unchanged
    position_embeddings: dict[str, Any] | None
    position_ids: torch.Tensor | None


@dataclass
class LanguageForward:
    """One forward of the language model: created by its pre-hook, consumed by its forward hook."""

    padding_mask: torch.Tensor | None  # (B, L_total) the language model's 2-D mask, as it received it
    prefill: Prefill | None = None  # a fresh prompt
    decoding: bool = False  # a step after a pruned prefill, with its cache
    layer_inputs: PrunedLayerInputs | None = None  # what the layers after the last pruning point get
    # (B, L_total) a decoding step's last-token attention in layer K-1 (captured only for re-ranking)
    decoding_rows: torch.Tensor | None = None
    # features the language model would add after its first layers (DeepStack), taken from its arguments
    layer_features: PromptFeatures | None = None


@dataclass
class PrunedPrompt:
    """What decoding steps need from the prefill: how each stage shortened the prompt."""

    prompt_length: int  # L, tokens of the prompt in the full layers
    cache: Cache | None
    stage_padding: list[torch.Tensor] = field(default_factory=list)  # per stage (B, L_s) bool: real slots
    # per stage (B,) long: real prompt tokens removed up to that stage (the decoding shift of `compact`)
    stage_removed: list[torch.Tensor] = field(default_factory=list)
    rerank: RerankState | None = None  # FastV's official re-ranking at every token (`pore.engine.rerank`)


@dataclass
class HookState:
    """The current object of each kind; `None` where no hook has created one."""

    incoming: IncomingCall | None = None
    forward: LanguageForward | None = None
    prompt: PrunedPrompt | None = None

    def call(self) -> IncomingCall:
        """The incoming call, created by whichever hook sees the forward first."""
        if self.incoming is None:
            self.incoming = IncomingCall()
        return self.incoming

    def prefill(self) -> Prefill | None:
        """The prompt of the forward in flight, if it is a fresh prompt."""
        return self.forward.prefill if self.forward is not None else None

    def clear(self) -> None:
        self.incoming = self.forward = self.prompt = None
