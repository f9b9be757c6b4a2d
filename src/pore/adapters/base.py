"""What the pruning engine needs to know about a model family.

An adapter answers three questions: which modules to hook (the multimodal wrapper that sees `input_ids`, the
language model and its decoder layers), where the image tokens are in a prompt, and where each one sits in
its image grid. Everything else (scoring, top-k, gathering, masks, cache) is shared by all families.

For methods that look into the vision tower (`pore.methods.requests`), an adapter may also describe the
encoder (`vision_encoder`) and map its positions to visual tokens (`vision_token_index`): one mapping from
which any per-position tensor of the tower (attention rows, hidden states, keys) is gathered per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pore.registry import Registry


@dataclass
class VisualLayout:
    """The visual tokens of a batch, padded to the largest count per sample.

    Shapes are (B, N) with N the largest number of visual tokens in any sample; entries past a sample's own
    count have `valid == False`. Tokens are listed in sequence order.
    """

    seq_index: torch.Tensor  # (B, N) long: position of the token in the input sequence
    image_index: torch.Tensor  # (B, N) long: which image of the sample the token belongs to
    row: torch.Tensor  # (B, N) long: row of the token in its image grid
    col: torch.Tensor  # (B, N) long: column of the token in its image grid
    grid_h: torch.Tensor  # (B, N) long: rows of the token's image grid
    grid_w: torch.Tensor  # (B, N) long: columns of the token's image grid
    valid: torch.Tensor  # (B, N) bool: a real visual token (not batch padding)
    prunable: torch.Tensor  # (B, N) bool: may be dropped (e.g. LLaVA-NeXT row separators may not)
    # (B, N) long: which grid of its image a token belongs to, for images made of several grids (LLaVA-NeXT:
    # 0 = base image, 1 = high-resolution tiles); None = one grid per image.
    part: torch.Tensor | None = None
    # (B, N) long: which frame of its video a token belongs to (0 for images), for families with video tokens
    # (Qwen2-VL: a video is one item of the layout, `image_index`, frame after frame); None = no videos.
    frame: torch.Tensor | None = None

    @property
    def grid_part(self) -> torch.Tensor:
        """(B, N) long: `part`, or zeros when every image is a single grid."""
        return self.part if self.part is not None else torch.zeros_like(self.seq_index)

    @property
    def frames(self) -> torch.Tensor:
        """(B, N) long: `frame`, or zeros when the batch has no videos."""
        return self.frame if self.frame is not None else torch.zeros_like(self.seq_index)

    @property
    def frame_counts(self) -> torch.Tensor:
        """(B, N) long: frames of the item (image or video) each token belongs to (1 for images)."""
        frames = self.frames
        if self.frame is None or frames.numel() == 0:
            return torch.ones_like(self.seq_index)
        items = int(self.image_index.max()) + 1
        key = (
            torch.arange(frames.shape[0], device=frames.device)[:, None] * items + self.image_index
        )  # (B, N)
        last = torch.zeros(frames.shape[0] * items, dtype=torch.long, device=frames.device)
        last = last.scatter_reduce(0, key.flatten(), frames.flatten(), "amax", include_self=True)
        return last[key] + 1

    @property
    def raster(self) -> torch.Tensor:
        """(B, N) long: raster index row * W + col of each token in its image grid."""
        return self.row * self.grid_w + self.col

    @property
    def images_per_sample(self) -> torch.Tensor:
        """(B,) long: number of images in each sample."""
        shifted = torch.where(self.valid, self.image_index + 1, torch.zeros_like(self.image_index))
        return shifted.max(dim=1).values if shifted.numel() else shifted.new_zeros(shifted.shape[0])


@dataclass
class LayerFeatures:
    """Features the language model adds to some tokens' hidden states after each of its first decoder layers
    (Qwen3-VL's DeepStack: vision features of intermediate encoder layers, one set per decoder layer, added
    to the visual tokens after decoder layers 0, 1, ...). Pruning removes tokens, so the engine adds them
    itself, to the tokens still in the sequence (`pore.engine.layer_features`)."""

    mask: torch.Tensor  # (B, L) bool: the prompt positions that receive features
    # per decoder layer i < len(features): (M, D) rows for the True positions of `mask`, batch-major order
    features: list[torch.Tensor]


@dataclass(frozen=True)
class ModelFacts:
    """What resolving a strategy needs to know about a model: read from its config alone (no weights), so
    that a run can check its settings before the weights load (`ModelAdapter.facts`)."""

    family: str  # the adapter's registered name
    num_layers: int | None  # decoder layers of the language model
    image_tokens: int | None = None  # prunable tokens per image when the count is fixed (LLaVA-1.5)
    multimodal_rope: bool = False  # 3-D M-RoPE positions (Qwen2-VL): kept tokens keep their positions
    pads_to_square: bool = False  # the family can encode images padded to a square (padding suppression)
    images_padded: bool | None = None  # whether this run's preprocessing padded them (None: not known)
    # whether the vision tower's per-position outputs ([CLS] attention, keys, hidden states) map to visual
    # tokens, for methods that read them (FasterVLM, VisionZip, ...); None: not known (not checked)
    vision_requests: bool | None = None
    # the deepest decoder layer a pruning stage may cut at (None: any), and why (Gemma 4's KV-shared layers)
    last_prunable_layer: int | None = None
    prunable_layers_reason: str = ""


class ModelAdapter(ABC):
    """Tells the engine where things are in one model family."""

    name: str
    #: the transformers classes (multimodal wrapper and its `...ForConditionalGeneration`) of the family
    classes: tuple[str, ...] = ()
    #: the `model_type` of the family's configs (for checks before the weights load)
    model_types: tuple[str, ...] = ()
    #: whether `adapter_for` picks this adapter by the model's class (False: only by its registered name)
    auto: bool = True
    #: whether the family can encode images padded to a square, one grid over the padded square (LLaVA-1.5);
    #: `prior.suppress_padding` needs it, and also that the run's preprocessing did pad (Pruner images_padded)
    pads_to_square: bool = False
    #: whether the language model uses 3-D M-RoPE positions (Qwen2-VL), which `strategy.positions=compact`
    #: cannot renumber
    multimodal_rope: bool = False
    #: whether the vision tower encodes an image as several views (LLaVA-NeXT: the base image and its tiles)
    encodes_views: bool = False
    #: whether `vision_encoder` / `vision_token_index` map the vision tower's positions to visual tokens (a
    #: [CLS] row per token: CLIP towers); methods that read the tower are refused before the weights load
    vision_requests: bool = False
    #: whether the language model adds features to tokens after its first layers (`take_layer_features`)
    adds_layer_features: bool = False
    #: a per-token argument of the decoder layers besides the hidden states, as (positional index, keyword):
    #: the engine gathers it at the kept tokens (Gemma 4's per-layer inputs); None: there is none
    per_token_layer_argument: tuple[int, str] | None = None
    #: the layer kinds whose mask lets the tokens of one image attend both ways (`bidirectional_blocks`):
    #: every kind in Gemma 3, the sliding-window layers only in Gemma 4
    bidirectional_layer_types: tuple[str, ...] = ("full_attention", "sliding_attention")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles `model` (by its class name)."""
        return cls.auto and type(model).__name__ in cls.classes

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        """Whether this adapter handles models of `config` (by its `model_type`)."""
        return cls.auto and getattr(config, "model_type", None) in cls.model_types

    @classmethod
    def fixed_image_tokens(cls, config: Any) -> int | None:
        """Prunable tokens per image when the family's count is fixed; None when it varies with the image."""
        return None

    @classmethod
    def facts(cls, config: Any, images_padded: bool | None = None) -> ModelFacts:
        """What a strategy is resolved against, from the model's config (`AutoConfig`: no weights)."""
        layers = getattr(config.get_text_config(), "num_hidden_layers", None)
        return ModelFacts(
            family=cls.name,
            num_layers=None if layers is None else int(layers),
            image_tokens=cls.fixed_image_tokens(config),
            multimodal_rope=cls.multimodal_rope,
            pads_to_square=cls.pads_to_square,
            images_padded=images_padded,
            vision_requests=cls.vision_requests,
        )

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def multimodal_module(self) -> nn.Module:
        """The module whose forward receives `input_ids` (to locate the image tokens): the `...Model` inside a
        `...ForConditionalGeneration` (transformers' layout for every VLM), or the model itself."""
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    def language_model(self) -> nn.Module:
        """The decoder-only language model (its forward receives the merged embeddings)."""
        return self.multimodal_module().language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: which positions of `input_ids` hold visual tokens (prunable or not); by default the
        config's `image_token_id` placeholders."""
        return input_ids == self.model.config.image_token_id

    @abstractmethod
    def visual_layout(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> VisualLayout:
        """Locate the visual tokens of a prompt batch (B, L) and their grid positions.

        `image_inputs` are the other keyword arguments the multimodal module's forward received (e.g.
        `image_sizes` for LLaVA-NeXT, `image_grid_thw` for Qwen2-VL): families whose grids vary per image
        read them; LLaVA-1.5 does not need them.
        """

    def bidirectional_blocks(
        self, input_ids: torch.Tensor, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor | None:
        """(B, L) long: for language models whose image tokens attend to each other both ways in the prompt
        (Gemma 3), the block of each position (tokens of one image share an id >= 0, -1 elsewhere), as the
        model builds it from this call; None (the default): every layer is causal."""
        return None

    # ------------------------------------------------------------------ the vision tower

    def vision_encoder(self) -> VisionEncoder:
        """The vision tower's encoder, for observation requests of the vision tower (its hidden states,
        attention, keys). Families that do not map encoder positions to visual tokens do not implement it."""
        raise NotImplementedError(
            f"the {self.name} adapter does not map its vision encoder's positions to visual tokens, so "
            f"requests of the vision tower (VisionHiddenStates, VisionAttention, VisionKeys) are not "
            f"supported for it; image and text embeddings and decoder requests are"
        )

    def layout_inputs(self) -> tuple[nn.Module, dict[str, str]] | None:
        """A module whose forward receives what `visual_layout` needs and generate() may not hand the
        multimodal forward (it encodes the images first), with {its argument: the `image_inputs` key to keep
        it under}; None (the default): the multimodal forward's arguments are enough."""
        return None

    def take_layer_features(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], LayerFeatures | None]:
        """The language model's arguments without the features it would add to token positions after its
        first decoder layers, and those features (None: the family has none). The engine calls it in the
        language model's pre-hook and adds the features to the tokens that survive pruning."""
        return kwargs, None

    def vision_token_index(
        self, layout: VisualLayout, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """(B, N) long: for each visual token, the encoder position it was made from, as an index into the
        tower's outputs flattened to (views * L_v) (views: every image's encoder inputs in batch order, L_v
        = `vision_encoder().positions`); -1 for tokens made from no position. `image_inputs` as for
        `visual_layout`. Any per-position tensor of the tower (views, L_v, ...) becomes per-token with
        `tokens_from_positions`."""
        raise NotImplementedError(
            f"the {self.name} adapter does not map its vision encoder's positions to visual tokens"
        )

    def vision_token_scores(
        self, cls_attention: torch.Tensor, layout: VisualLayout, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """(B, N) float64 score of each visual token from the encoder's (views, L_v) [CLS] attention rows:
        the row of its view at its own patch; 0 for tokens that are not prunable grid tokens."""
        index = self.vision_token_index(layout, image_inputs)
        scores = tokens_from_positions(cls_attention, index)  # (B, N)
        return torch.where(layout.valid & layout.prunable, scores, torch.zeros_like(scores)).double()

    def vision_token_views(
        self, layout: VisualLayout, image_inputs: Mapping[str, Any] | None = None
    ) -> torch.Tensor | None:
        """(B, N) long: which encoder view of its image each visual token was encoded in (-1: none), for
        families that encode an image as several views (LLaVA-NeXT: base image, tiles); None: one view."""
        if not self.encodes_views:
            return None
        return views_from_index(self.vision_token_index(layout, image_inputs), layout, self.vision_encoder())


@dataclass(frozen=True)
class VisionEncoder:
    """A family's vision encoder as the observation requests see it (`ModelAdapter.vision_encoder`)."""

    layers: nn.ModuleList  # the encoder layers, in order
    config: Any  # the tower's sub-config (its attention implementation is switched to watch its attention)
    feature_layer: int  # the `hidden_states` index of the features the language model reads, in [0, layers]
    positions: int  # L_v: positions of one view, the [CLS] token included
    has_cls: bool  # position 0 of every view is a [CLS] token

    def hidden_states_index(self, layer: int | None) -> int:
        """`hidden_states[layer]` as a non-negative index (None: the features the language model reads)."""
        count = len(self.layers) + 1
        index = self.feature_layer if layer is None else (layer if layer >= 0 else count + layer)
        if not 0 <= index < count:
            raise ValueError(f"vision hidden_states[{layer}] does not exist: the tower has {count} of them")
        return index

    def layer_index(self, layer: int | None) -> int:
        """Encoder layer `layer` as a non-negative index (None: the layer whose output the LLM reads)."""
        count = len(self.layers)
        if layer is None:
            if self.feature_layer == 0:
                raise ValueError("the vision features are the embeddings: they do not come out of a layer")
            return self.feature_layer - 1
        index = layer if layer >= 0 else count + layer
        if not 0 <= index < count:
            raise ValueError(f"vision encoder layer {layer} does not exist: the tower has {count} layers")
        return index


def tokens_from_positions(per_position: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) the rows of a (views, L_v, ...) tensor of the vision tower at `index` (B, N) into its
    flattened (views * L_v) positions (`ModelAdapter.vision_token_index`); zeros where the index is -1."""
    flat = per_position.reshape(-1, *per_position.shape[2:])  # (views * L_v, ...)
    index = index.to(flat.device)
    if index.numel() and int(index.max()) >= flat.shape[0]:
        raise RuntimeError(
            f"the vision tower saw {per_position.shape[0]} views of {per_position.shape[1]} positions, "
            f"fewer than the visual tokens point into"
        )
    rows = flat[index.clamp(min=0)]  # (B, N, ...)
    missing = (index < 0).view(*index.shape, *([1] * (rows.dim() - 2)))
    return rows.masked_fill(missing, 0)


def views_from_index(index: torch.Tensor, layout: VisualLayout, encoder: VisionEncoder) -> torch.Tensor:
    """(B, N) long: the view of its image each token's encoder position lies in (0 = the image's first
    view), -1 for tokens without a position and tokens that are not prunable."""
    view = torch.where(index >= 0, index // encoder.positions, -1)  # (B, N) view in the batch
    # An image's first view is the smallest view among its tokens (its base view always has tokens).
    largest = torch.iinfo(torch.long).max
    first = torch.zeros_like(view)
    for image in range(int(layout.images_per_sample.max()) if view.numel() else 0):
        of_image = layout.valid & (layout.image_index == image)  # (B, N)
        smallest = torch.where(of_image & (view >= 0), view, largest).min(dim=1, keepdim=True).values
        first = torch.where(of_image, smallest, first)  # (B, N)
    in_grid = layout.valid & layout.prunable & (view >= 0)
    return torch.where(in_grid, view - first, -1)


def visual_slots(is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The visual tokens of a batch left-aligned per sample, the layout's (B, N) axes.

    is_visual: (B, L) bool. Returns seq_index (B, N) long (position in the sequence, 0 in batch-padding
    slots), slot (B, N) long (the token's rank among its sample's visual tokens), valid (B, N) bool, and
    counts (B,) long, with N the largest count of the batch.
    """
    counts = is_visual.sum(dim=1)  # (B,)
    batch, n = is_visual.shape[0], int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~is_visual).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, N)
    slot = torch.arange(n, device=is_visual.device).expand(batch, n)  # (B, N)
    valid = slot < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), slot, valid, counts


ADAPTERS: Registry[type[ModelAdapter]] = Registry("model adapter")


def adapter_for(model: nn.Module, name: str | None = None) -> ModelAdapter:
    """The adapter registered as `name`, or the one that matches `model`'s class."""
    if name is not None:
        return ADAPTERS.get(name)(model)
    for adapter_name in ADAPTERS:
        adapter_cls = ADAPTERS.get(adapter_name)
        if adapter_cls.matches(model):
            return adapter_cls(model)
    raise ValueError(
        f"no model adapter handles {type(model).__name__}; supported families: {', '.join(ADAPTERS.names())}"
    )


def adapter_class_for_config(config: Any, name: str | None = None) -> type[ModelAdapter]:
    """The adapter class registered as `name`, or the one whose family has `config.model_type`."""
    if name is not None:
        return ADAPTERS.get(name)
    for adapter_name in ADAPTERS:
        adapter_cls = ADAPTERS.get(adapter_name)
        if adapter_cls.matches_config(config):
            return adapter_cls
    model_type = getattr(config, "model_type", None)
    raise ValueError(
        f"no model adapter handles model_type {model_type!r}; supported families: "
        f"{', '.join(ADAPTERS.names())}"
    )
