"""What a pruning method can ask to see: observation requests.

A method lists what it needs in `PruningMethod.requests` (or returns it from `observations()` when it depends
on the method's options). The engine captures exactly that, at no cost for anything else, and hands it to
`score` and `recycle` in `ScoringInputs`: `inputs[request]` is what the request below says, for the stage
being pruned. Shapes: B samples, N visual-token slots of `inputs.layout` (sequence order, padded per batch),
L the prompt's length, L_cur the current sequence's length (the prompt less what earlier stages removed),
T text tokens, D the language model's hidden size, D_v the vision tower's, H / H_kv attention / key heads,
d the head size. Slots without a value (batch padding, LLaVA-NeXT row separators in vision requests,
tokens an earlier stage removed in decoder requests) hold zeros.

Vision-tower requests count layers as transformers' own outputs do: `VisionHiddenStates(j)` is
`vision_tower(..., output_hidden_states=True).hidden_states[j]` (0 = the embeddings, j = the output of
encoder layer j - 1), `VisionAttention(j)` / `VisionKeys(j)` belong to encoder layer j (`attentions[j]`);
negative j counts from the end, `None` means the features the language model reads (`vision_feature_layer`)
and the encoder layer that produced them. Each encoder position is gathered to the visual token made from it
(`ModelAdapter.vision_token_index`): LLaVA-1.5 and LLaVA-NeXT (base view and tiles) support all vision
requests; Qwen2-VL has no [CLS] token and merges 2 x 2 patches into one token, so it supports none of them
(the embeddings and decoder requests work for every family).

Decoder requests count layers from the pruning layer K of the stage: `offset=0` is layer K's input,
`offset=-1` layer K-1's. They see the sequence the stage prunes, so the layer must lie at or after the
previous stage's K (for the first stage: at or after layer 0); keys are those of an attention call that
ran before the pruning, so `DecoderKeys` needs `offset <= -1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch


class Request:
    """Base of the requests: frozen dataclasses, so that equal requests are one capture (and a dict key)."""

    @property
    def lowest_layer(self) -> int:
        """The smallest pruning layer K at which the engine can serve this request."""
        return 0

    def serves(self, stage: int) -> bool:
        """Whether the engine captures this request for pruning stage `stage` (a request with a `stage`
        field: that stage only; every other request: every stage)."""
        wanted = getattr(self, "stage", None)
        return wanted is None or wanted == stage


# ------------------------------------------------------------------------------ language-model attention


@dataclass(frozen=True)
class LastTokenAttention(Request):
    """(B, L_cur) float32: the last prompt token's attention over the current sequence, mean over heads, in
    layer K-1 (FastV), or with `own_layer` in layer K itself: layer K's input norm and attention module run
    once more, without the cache, on layer K's input (PyramidDrop's official scoring)."""

    own_layer: bool = False

    @property
    def lowest_layer(self) -> int:
        return 1


class TextRows(NamedTuple):
    """What `TextAttention` delivers."""

    attention: torch.Tensor  # (B, Q, L_cur) float32: each text query's attention, mean over heads
    valid: torch.Tensor  # (B, Q) bool: a real text query (not padding of the Q axis)
    positions: torch.Tensor  # (B, Q) long: where the text queries sit in the current sequence


@dataclass(frozen=True)
class TextAttention(Request):
    """`TextRows`: the attention every real text token of the prompt pays the current sequence, in layer K-1
    (or layer K with `own_layer`, as `LastTokenAttention`). SparseVLM's raters. `stage`: captured for that
    pruning stage only (HiMAP's text-guided first stage); None: every stage."""

    own_layer: bool = False
    stage: int | None = None

    @property
    def lowest_layer(self) -> int:
        return 1


class ImageRows(NamedTuple):
    """What `ImageAttention` delivers."""

    attention: torch.Tensor  # (B, Q, L_cur) float32: each visual query's attention, mean over heads
    valid: torch.Tensor  # (B, Q) bool: a real query (not padding of the Q axis)
    tokens: torch.Tensor  # (B, Q) long: the visual token (slot n of `inputs.layout`) of each query


@dataclass(frozen=True)
class ImageAttention(Request):
    """`ImageRows`: the attention every visual token still in the sequence pays the current sequence (its
    row of the attention map), in layer K-1 (or layer K with `own_layer`). HiMAP's image-to-image scores.
    Only these rows are computed (their count is the visual tokens still there, not the sequence's length).
    `stage`: captured for that pruning stage only (HiMAP's second stage); None: every stage."""

    own_layer: bool = False
    stage: int | None = None

    @property
    def lowest_layer(self) -> int:
        return 1


# ------------------------------------------------------------------------------ vision tower


@dataclass(frozen=True)
class VisionHiddenStates(Request):
    """(B, N, D_v): the vision tower's `hidden_states[layer]` at the encoder position of each visual token
    (the patch it was made from; a LLaVA-1.5 `full` [CLS] image token: the [CLS] position)."""

    layer: int | None = None


@dataclass(frozen=True)
class VisionAttention(Request):
    """(B, N) float32: in encoder layer `layer`, the [CLS] query's attention (mean over heads, softmax over
    every position of its view) to the patch of each visual token; 0 for tokens without a patch. FasterVLM.
    `heads="joint"`: one softmax of the [CLS] query's dot product with each key over all heads concatenated,
    scaled by (H d)^-1/2 (PruMerge's attention from the layer's q_proj / k_proj outputs). Families without
    a [CLS] token (Qwen2-VL) refuse it."""

    layer: int | None = None
    heads: Literal["mean", "joint"] = "mean"

    def __post_init__(self) -> None:
        if self.heads not in ("mean", "joint"):
            raise ValueError(f"VisionAttention(heads={self.heads!r}): use 'mean' or 'joint'")


@dataclass(frozen=True)
class VisionKeys(Request):
    """(B, N, H, d): the key states of encoder layer `layer`'s attention at each visual token's patch (per
    head; `.flatten(2)` gives PruMerge's concatenated keys, `.mean(2)` VisionZip's)."""

    layer: int | None = None


# ------------------------------------------------------------------------------ embeddings


@dataclass(frozen=True)
class ImageEmbeddings(Request):
    """(B, N, D): the language model's input embeddings of the visual tokens, i.e. the projected image
    features (`get_image_features`), before any decoder layer."""


class TextTokens(NamedTuple):
    """What `TextEmbeddings` delivers."""

    embeddings: torch.Tensor  # (B, T, D) the input embeddings of each sample's real text tokens, in order
    positions: torch.Tensor  # (B, T) long: their positions in the prompt (left-aligned; padding slots: 0)
    valid: torch.Tensor  # (B, T) bool: a real text token (not padding of the T axis)


@dataclass(frozen=True)
class TextEmbeddings(Request):
    """`TextTokens`: the language model's input embeddings of the prompt's text tokens (every real token that
    is not a visual token)."""


@dataclass(frozen=True)
class PromptEmbeddings(Request):
    """(B, L, D): the language model's input embeddings of the whole prompt (index with
    `inputs.prompt_seq_index` / `inputs.origin`); also `inputs.input_embeddings`."""


# ------------------------------------------------------------------------------ decoder layers


@dataclass(frozen=True)
class DecoderHiddenStates(Request):
    """(B, N, D): the input hidden states of decoder layer K + `offset` at each visual token still in the
    sequence (`offset=0`: what layer K receives before this stage prunes; at the first stage equal to the
    unpruned model's `output_hidden_states[K + offset]`). `sequence=True`: (B, L_cur, D), every slot.
    `final_norm=True`: through the language model's final norm (`language_model.norm`), as DART compares."""

    offset: int = 0
    sequence: bool = False
    final_norm: bool = False

    def __post_init__(self) -> None:
        if self.offset > 0:
            raise ValueError(f"DecoderHiddenStates(offset={self.offset}): layers after K have not run yet")

    @property
    def lowest_layer(self) -> int:
        return -self.offset


@dataclass(frozen=True)
class DecoderKeys(Request):
    """(B, N, H_kv, d): the key states (after RoPE, as the attention implementation receives them) of decoder
    layer K + `offset` at each visual token still in the sequence. `sequence=True`: (B, L_cur, H_kv, d)."""

    offset: int = -1
    sequence: bool = False

    def __post_init__(self) -> None:
        if self.offset > -1:
            raise ValueError(
                f"DecoderKeys(offset={self.offset}): only layers before K have run their attention when "
                "layer K prunes; use offset <= -1"
            )

    @property
    def lowest_layer(self) -> int:
        return -self.offset


VISION_REQUESTS = (VisionHiddenStates, VisionAttention, VisionKeys)
DECODER_REQUESTS = (DecoderHiddenStates, DecoderKeys)
ATTENTION_REQUESTS = (LastTokenAttention, TextAttention, ImageAttention)
