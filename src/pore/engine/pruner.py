"""The pruning engine: drop image tokens between decoder layers of a transformers VLM, through hooks.

How one prefill runs with a pruner attached (K = a stage's `strategy.layer`; one stage for FastV and PoRe,
several for PyramidDrop):

1. A forward pre-hook on the multimodal wrapper reads `input_ids` (and `image_sizes` / `image_grid_thw`);
   the model adapter locates the visual tokens and their (row, col) in their image grid.
2. A forward pre-hook on the language model decides prefill vs continuation (from the KV cache) and keeps
   the 2-D padding mask.
3. In layer K-1, the scoring attention wrapper (`pore.engine.tap`) computes the rows of attention
   the method needs (the last prompt token's, or the text tokens') from the query/key states, while SDPA /
   FlashAttention / eager runs unchanged (PyramidDrop's official `score_from=own_layer`: in an extra
   no-cache call of layer K's own input norm + attention module on layer K's input, by the layer-K hook).
   FasterVLM's [CLS] row is caught the same way in the vision tower.
4. A forward pre-hook on decoder layer K scores the visual tokens still in the sequence (method x prior),
   keeps the top `keep` of each image, lets the method rewrite the kept hidden states (pooling, merging),
   gathers the hidden states, RoPE embeddings and position ids of the kept tokens (which keep their
   original positions), and builds the attention mask for the shorter sequence. Pre-hooks on the later
   layers hand them the same pruned mask and embeddings, until the next stage shortens them again.

Layers below the first K therefore cache every token, each stage's layers only what it kept (a
`DynamicCache` holds one length per layer). At each decoding step the hook on every stage's first layer
rebuilds that stage's mask from its pruned prompt mask plus the new tokens' mask; RoPE positions come from
the full layers, so new tokens get their true positions.

Positions (`strategy.positions`, resolved per method): `original` keeps each token's RoPE position as above;
`compact` renumbers the kept sequence: a kept token's position drops by the number of real tokens removed
before it (0..L'-1 for positions counted from each sample's first real token, as generate() does under left
padding), the (cos, sin) of the kept tokens are recomputed with the language model's own rotary embedding,
and at decoding steps each stage's layers see the new tokens' positions minus the tokens that stage removed,
so decoding continues from the compacted length (PyramidDrop's, SparseVLM's and FasterVLM's official
behaviour). 3-D M-RoPE models (Qwen2-VL) keep `original` (see `_resolve_positions`).

The forward's outputs (logits, hidden states) cover the kept sequence: text tokens plus kept image tokens in
their original order. What each prefill did is in `Pruner.last_record`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from pore import compat
from pore.adapters import ModelAdapter, VisualLayout, adapter_for
from pore.engine import tap as scoring
from pore.engine.record import PruningRecord
from pore.methods import METHODS, ScoringInputs
from pore.priors import padding_fraction
from pore.strategy import Strategy

# The pruner attached to each model: two would fight over the same hooks and attention implementation.
_ATTACHED: WeakKeyDictionary[nn.Module, Pruner] = WeakKeyDictionary()


@dataclass
class _Prefill:
    """State of one forward over a fresh prompt, updated by each pruning stage."""

    input_ids: torch.Tensor  # (B, L) the prompt
    padding_mask: torch.Tensor  # (B, L) bool, True = real token
    layout: VisualLayout  # (B, N) the prompt's visual tokens, positions in the unpruned sequence
    alive: torch.Tensor  # (B, N) bool: visual tokens still in the sequence
    position: torch.Tensor  # (B, N) long: where each alive visual token sits in the current sequence
    origin: torch.Tensor  # (B, L_cur) long: position in the prompt of each slot of the current sequence
    current_padding: torch.Tensor  # (B, L_cur) bool: real tokens of the current sequence
    vision_attention: torch.Tensor | None = None  # (B, N) [CLS] attention of each token's patch
    vision_views: torch.Tensor | None = None  # (B, N) the encoder view of each token (LLaVA-NeXT tiles)
    input_embeddings: torch.Tensor | None = None  # (B, L, D) the prompt's embeddings (methods that read them)
    # Filled by the scoring layer of the next stage: (B, L_cur), or (B, Q, L_cur) with (B, Q) valid queries.
    last_token_attention: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None
    text_positions: torch.Tensor | None = None  # (B, Q) long: the text queries' current positions
    # (B, L_cur) long: RoPE positions of the current sequence (kept only for strategy.positions=compact)
    current_positions: torch.Tensor | None = None
    stage: int = 0  # the next stage to run
    stage_kept: list[torch.Tensor] = field(default_factory=list)  # per stage (B, N) bool
    stage_scores: list[torch.Tensor] = field(default_factory=list)  # per stage (B, N) float64


@dataclass
class _PrunedLayerInputs:
    """What every decoder layer after a pruning point receives instead of the language model's arguments."""

    attention_mask: Any  # in the backend's own format (None, 4-D bool / float, or 2-D)
    position_embeddings: Any  # (cos, sin) of the kept tokens; None = unchanged
    position_ids: torch.Tensor | None


@dataclass
class _Sequence:
    """What decoding steps need from the prefill: how each stage shortened the prompt."""

    prompt_length: int  # L, tokens of the prompt in the full layers
    stage_padding: list[torch.Tensor]  # per stage (B, L_s) bool: real tokens among the pruned prompt's slots
    cache: Cache | None
    # per stage (B,) long: real prompt tokens removed up to that stage (the decoding shift of `compact`)
    stage_removed: list[torch.Tensor] = field(default_factory=list)


def gather_sequence(tensor: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather `index` (B, L') along `seq_dim` of `tensor`, whose batch dim (just before it) may be 1."""
    batch_dim = seq_dim - 1
    shape = list(tensor.shape)
    shape[batch_dim] = index.shape[0]
    tensor = tensor.expand(*shape)
    view = [1] * tensor.dim()
    view[batch_dim], view[seq_dim] = index.shape
    full_index = index.view(view).expand(*shape[:seq_dim], index.shape[1], *shape[seq_dim + 1 :])
    return tensor.gather(seq_dim, full_index)


class Pruner:
    """Attach a pruning strategy to a transformers VLM. Use as a context manager or attach()/detach().

    >>> with Pruner(model, build_strategy("pore_linear", keep=64)) as pruner:
    ...     answer = model.generate(**inputs, max_new_tokens=16)
    ...     pruner.last_record.kept_raster  # per sample, per image: indices of the grid tokens kept
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: Strategy,
        adapter: str | ModelAdapter | None = None,
        images_padded: bool | None = None,
    ) -> None:
        """`images_padded`: whether the images were padded to a square before encoding (the evaluation
        pipeline knows it from the protocol and the processor); None = the caller vouches for it."""
        compat.warn_if_untested()
        self.model = model
        self.adapter = adapter if isinstance(adapter, ModelAdapter) else adapter_for(model, adapter)
        self.layers = self.adapter.decoder_layers()
        # What runs is what the strategy resolves to on this model (layers scaled to its depth, positions and
        # padding checked for its family): never the strategy as given.
        self.strategy = strategy.resolve(type(self.adapter).facts(model.config, images_padded))
        self.stages = self.strategy.stages()
        self.method = METHODS.get(self.strategy.method)(seed=self.strategy.seed, **self.strategy.options)
        self.positions = self.strategy.positions
        self.last_record: PruningRecord | None = None
        self._image_sizes: list[list[tuple[int, int]]] | None = None
        self._handles: list[Any] = []
        self._watched: list[nn.Module] = []
        self._original_attention: dict[str, str] = {}
        self._pending_input_ids: torch.Tensor | None = None
        self._pending_image_inputs: dict[str, Any] = {}
        self._pending_vision_attention: torch.Tensor | None = None
        self._prefill: _Prefill | None = None
        self._decoding = False
        self._sequence: _Sequence | None = None
        self._pruned_inputs: _PrunedLayerInputs | None = None
        self._language_model_padding_mask: torch.Tensor | None = None
        self._check_supported()

    # ------------------------------------------------------------------ lifecycle

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> Pruner:
        if self.attached or not self.method.prunes:
            return self
        other = _ATTACHED.get(self.model)
        if other is not None and other is not self:
            raise RuntimeError("another Pruner is attached to this model; detach it first")
        _ATTACHED[self.model] = self
        try:
            self._install_hooks()
        except BaseException:
            self.detach()  # a half-attached pruner (e.g. an unsupported method) must not stay registered
            raise
        return self

    def _install_hooks(self) -> None:
        language_model = self.adapter.language_model()
        self._handles = [
            self.adapter.multimodal_module().register_forward_pre_hook(self._on_multimodal, with_kwargs=True),
            language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
            language_model.register_forward_hook(self._after_language_model, always_call=True),
        ]
        stage_of_layer = {stage.layer: index for index, stage in enumerate(self.stages)}
        for index in range(self.stages[0].layer, len(self.layers)):
            if index in stage_of_layer:
                hook = partial(self._on_pruning_layer, stage_of_layer[index])
            else:
                hook = self._on_pruned_layer
            self._handles.append(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        if self.method.needs_attention:
            self._use_scoring_attention(language_model.config)
            for index, stage in enumerate(self.stages):
                scoring_layer = stage.layer if self.method.scores_in_own_layer else stage.layer - 1
                module = self.adapter.attention_module(self.layers[scoring_layer])
                scoring.watch(module, partial(self._on_scoring_attention, index))
                self._watched.append(module)
        if self.method.vision_attention:
            module, config = self.adapter.vision_scoring_attention()
            self._use_scoring_attention(config)
            scoring.watch(module, self._on_vision_attention)
            self._watched.append(module)

    def detach(self) -> None:
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._watched:
            scoring.unwatch(module)
        self._watched = []
        if self._original_attention:
            self.model.set_attn_implementation(self._original_attention)
            self._original_attention = {}
        self._prefill = self._sequence = self._pruned_inputs = None

    def __enter__(self) -> Pruner:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def set_image_sizes(self, sizes: list[list[tuple[int, int]]] | None) -> None:
        """Original (height, width) of every image, per sample, for the next prefill: padding suppression,
        and the layout of families whose token count depends on the size (LLaVA-NeXT) when generate()
        does not hand `image_sizes` to the forward."""
        self._image_sizes = sizes

    # ------------------------------------------------------------------ checks and set-up

    def _config_key(self, sub_config: Any) -> str:
        """The key of `sub_config` in the model's config ("" = the top-level config)."""
        config = self.model.config
        for key in getattr(config, "sub_configs", {}):
            if getattr(config, key, None) is sub_config:
                return key
        return ""

    def _use_scoring_attention(self, sub_config: Any) -> None:
        """Switch one sub-model to the `pore_<base>` attention wrapper (remembering the base to restore)."""
        key = self._config_key(sub_config)
        base = sub_config._attn_implementation
        self._original_attention[key] = base
        self.model.set_attn_implementation({key: scoring.scoring_implementation(base)})

    def _check_supported(self) -> None:
        config = self.adapter.language_model().config
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise NotImplementedError(
                f"pruning supports language models whose layers all use full attention; this one has "
                f"{sorted(set(layer_types))}"
            )

    # ------------------------------------------------------------------ hooks

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending_input_ids = input_ids
        # What the adapter may need to place the visual tokens (image_sizes, image_grid_thw, ...).
        self._pending_image_inputs = {key: value for key, value in kwargs.items() if key != "input_ids"}
        # No reset of the pending vision attention here: generate() may run the vision encoder before the
        # multimodal forward (passing `mm_encoder_outputs`); the language-model hook consumes it.

    def _on_vision_attention(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> None:
        # (images, L_v): the [CLS] query's attention over the encoder's tokens; the encoder is bidirectional.
        cls_position = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
        self._pending_vision_attention = scoring.query_attention(
            query, key, attention_mask, scaling, cls_position, causal=False
        )[:, 0]

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._prefill, self._pruned_inputs, self._decoding = None, None, False
        input_ids, self._pending_input_ids = self._pending_input_ids, None
        image_inputs, self._pending_image_inputs = self._pending_image_inputs, {}
        vision_attention, self._pending_vision_attention = self._pending_vision_attention, None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("the pruner needs the VLM to call its language model with inputs_embeds")
        cache = compat.cache_from(kwargs)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise NotImplementedError(
                f"pruned layers hold fewer tokens than full ones, which needs a DynamicCache; got "
                f"{type(cache).__name__} (do not pass cache_implementation='static' to generate)"
            )
        padding_mask = kwargs.get("attention_mask")
        if padding_mask is not None and padding_mask.dim() != 2:
            raise NotImplementedError(
                "the pruner needs a 2-D padding mask (batch, length), not a prepared 4-D mask"
            )
        batch, length = embeds.shape[:2]
        self._language_model_padding_mask = padding_mask

        if cache is not None and cache.get_seq_length() > 0:  # continuation: decoding steps
            if self._sequence is None or self._sequence.cache is not cache:
                raise RuntimeError("a cached continuation reached the pruner without its prefill")
            # New images at a decoding step (multi-turn with a cache); an image token id that a model
            # generates without pixels is only a token.
            has_pixels = any(
                image_inputs.get(key) is not None for key in ("pixel_values", "pixel_values_videos")
            )
            if has_pixels and input_ids is not None and self._has_image_tokens(input_ids):
                raise NotImplementedError(
                    "image tokens after the prefill (multi-turn with a cache) are not supported"
                )
            self._decoding = True
            return

        position_ids = kwargs.get("position_ids")
        if position_ids is not None and bool((position_ids.reshape(-1, length) > 0).all()):
            # Every prompt starts at position 0 (generate() gives left padding position 1): tokens that all
            # sit further on continue a sequence whose cache the pruner was not shown.
            raise compat.PruningTripwire(
                "a decoding step reached the pruner as a new prompt (no KV cache was found among the "
                f"language model's arguments {sorted(kwargs)}, but its positions do not start at 0)"
            )
        if input_ids is None:
            raise ValueError(
                "pass input_ids (not inputs_embeds) to the VLM so the pruner can find the image tokens"
            )
        if input_ids.shape != (batch, length):
            raise RuntimeError(
                f"input_ids {tuple(input_ids.shape)} do not match the embeddings {(batch, length)}"
            )
        if padding_mask is None:
            padding_mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        padding_mask = padding_mask[:, -length:].bool()
        if not bool(padding_mask[:, -1].all()):
            raise ValueError(
                "prompts must be left-padded so that the last position is each prompt's last token: "
                "set processor.tokenizer.padding_side = 'left'"
            )
        if image_inputs.get("image_sizes") is None and self._image_sizes is not None:
            # generate() may encode the images before the prefill and keep `image_sizes` from the forward
            # (transformers >= 5.23); the sizes given to set_image_sizes stand in for them.
            sizes = [size for sample in self._image_sizes for size in sample]
            image_inputs = {**image_inputs, "image_sizes": torch.tensor(sizes, device=input_ids.device)}
        layout = self.adapter.visual_layout(input_ids, image_inputs)
        if self.method.vision_attention:
            if vision_attention is None:
                raise RuntimeError("the vision encoder did not report its [CLS] attention; no pixel_values?")
            vision_attention = self.adapter.vision_token_scores(vision_attention, layout, image_inputs)
            vision_views = self.adapter.vision_token_views(layout, image_inputs)
        else:
            vision_views = None
        self._prefill = _Prefill(
            input_ids=input_ids,
            padding_mask=padding_mask,
            layout=layout,
            alive=layout.valid.clone(),
            position=layout.seq_index.clone(),
            origin=torch.arange(length, device=input_ids.device).expand(batch, length),
            current_padding=padding_mask,
            vision_attention=vision_attention,
            vision_views=vision_views,
            input_embeddings=embeds if self.method.needs_input_embeddings else None,
        )
        self._sequence = None

    def _after_language_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        prefill, decoding, pruned = self._prefill, self._decoding, self._pruned_inputs
        self._prefill, self._pruned_inputs, self._decoding = None, None, False
        if output is None:  # the forward raised; its own error says what went wrong
            return
        if prefill is not None and prefill.stage < len(self.stages) and bool(prefill.layout.valid.any()):
            layer = self.stages[prefill.stage].layer
            raise compat.PruningTripwire(
                f"a prompt with image tokens went through the language model without being pruned: the "
                f"hook on decoder layer {layer} did not run (stage {prefill.stage} of {len(self.stages)})"
            )
        if decoding and pruned is None:
            raise compat.PruningTripwire(
                f"a decoding step went through the language model without the pruned layers' mask: the "
                f"hook on decoder layer {self.stages[0].layer} did not run"
            )

    def _on_scoring_attention(
        self,
        stage: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        prefill = self._prefill
        if prefill is None or prefill.stage != stage:
            return
        if self.method.attention_queries == "last":
            prefill.last_token_attention = scoring.query_attention(query, key, attention_mask, scaling)[:, 0]
        else:
            positions, valid = self._text_queries(prefill)
            prefill.text_attention = scoring.query_attention(query, key, attention_mask, scaling, positions)
            prefill.text_valid = valid
            prefill.text_positions = positions

    def _text_queries(self, prefill: _Prefill) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q) positions of the current sequence's real text tokens, left-aligned, and (B, Q) valid."""
        visual = torch.zeros_like(prefill.input_ids, dtype=torch.bool)  # (B, L)
        visual.scatter_(1, prefill.layout.seq_index, prefill.layout.valid)
        is_text = prefill.current_padding & ~visual.gather(1, prefill.origin)  # (B, L_cur)
        count = int(is_text.sum(dim=1).max())
        order = torch.argsort((~is_text).to(torch.int8), dim=1, stable=True)[:, :count]  # (B, Q)
        return order, is_text.gather(1, order)

    def _on_pruning_layer(
        self, stage: int, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        if self._prefill is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.method.scores_in_own_layer:
                self._score_in_own_layer(module, hidden, args, kwargs)
            hidden = self._prune_prompt(stage, hidden, kwargs)
            args, kwargs = (
                ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
            )
        elif self._decoding:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._pruned_inputs = self._decoding_inputs(stage, hidden, kwargs)
        return self._on_pruned_layer(module, args, kwargs) or (args, kwargs)

    def _score_in_own_layer(self, layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """PyramidDrop's official scoring: run layer K's own input norm and attention module on layer K's
        input (the current sequence, before this stage prunes it), without the cache, so that the watched
        attention reports the last prompt token's row; the output is discarded."""
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise NotImplementedError(
                f"options.score_from=own_layer needs decoder layers with an input_layernorm; "
                f"{type(layer).__name__} has none (use options.score_from=previous_layer)"
            )
        # What the layer receives for the current sequence: after an earlier stage, that stage's inputs.
        _, layer_kwargs = self._on_pruned_layer(layer, args, kwargs) or (args, kwargs)
        self.adapter.attention_module(layer)(
            hidden_states=norm(hidden),
            attention_mask=layer_kwargs.get("attention_mask"),
            position_embeddings=layer_kwargs["position_embeddings"],
            position_ids=layer_kwargs.get("position_ids"),
        )  # no cache argument: its keyword moves between releases, and its default (None) is what we want

    def _on_pruned_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pruned = self._pruned_inputs
        if pruned is None:
            return None
        kwargs = {**kwargs, "attention_mask": pruned.attention_mask}
        if pruned.position_embeddings is not None:
            kwargs["position_embeddings"] = pruned.position_embeddings
        if "position_ids" in kwargs:
            kwargs["position_ids"] = pruned.position_ids
        return args, kwargs

    # ------------------------------------------------------------------ the pruning itself

    def _has_image_tokens(self, input_ids: torch.Tensor) -> bool:
        return bool(self.adapter.visual_token_mask(input_ids).any())

    def _scoring_inputs(self, stage: int, prefill: _Prefill) -> ScoringInputs:
        layout = prefill.layout
        method = self.method
        if (method.attention_queries == "last" and prefill.last_token_attention is None) or (
            method.attention_queries == "text" and prefill.text_attention is None
        ):
            raise RuntimeError(
                f"layer {self.stages[stage].layer - (0 if method.scores_in_own_layer else 1)} did not report "
                f"its attention; is the model's forward hooked?"
            )
        current = VisualLayout(**{**vars(layout), "seq_index": prefill.position})
        return ScoringInputs(
            layout=current,
            alive=prefill.alive,
            input_ids=prefill.input_ids,
            attention_mask=prefill.padding_mask,
            budget=self.stages[stage].budget,
            stage=stage,
            last_token_attention=prefill.last_token_attention,
            text_attention=prefill.text_attention,
            text_valid=prefill.text_valid,
            vision_attention=prefill.vision_attention,
            vision_views=prefill.vision_views,
            text_positions=prefill.text_positions,
            origin=prefill.origin,
            prompt_seq_index=layout.seq_index,
            input_embeddings=prefill.input_embeddings,
        )

    def _select(self, stage: int, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Which visual tokens survive this stage: (B, N) bool, and the (B, N) weighted scores ranked."""
        layout = inputs.layout
        settings = self.stages[stage]
        scores = self.method.score(inputs)
        prior = self.strategy.prior
        cut_to_unpadded = prior.suppress_padding and prior.budget_from_unpadded
        not_padding = None  # (B, N) 1 = not padding, 0 = padding (when padding suppression is on)
        if prior.suppress_padding and (settings.reweight or cut_to_unpadded):
            not_padding = self._padding_weights(layout)
        if settings.reweight:
            weights = prior.weights(layout.row, layout.col, layout.grid_h, layout.grid_w)
            if not_padding is not None:
                weights = weights * not_padding
            scores = scores * weights.to(scores.device)
        weighted = scores  # (B, N)

        prunable = layout.valid & layout.prunable  # (B, N)
        candidates = inputs.candidates()  # (B, N)
        # The PoRe authors' FastV: only tokens that are not padding compete, and the budget is cut to their
        # number (at every stage, so that a later stage never asks for the padding dropped here).
        ranked_among = candidates & (not_padding > 0).to(candidates.device) if cut_to_unpadded else candidates
        kept = layout.valid & ~layout.prunable  # never-prunable tokens stay
        n_slots = weighted.shape[1]
        slot = torch.arange(n_slots, device=weighted.device)
        images = int(layout.images_per_sample.max()) if weighted.numel() else 0
        for image in range(images):
            in_image = candidates & (layout.image_index == image)  # (B, N)
            count = in_image.sum(dim=1)  # (B,)
            original = (prunable & (layout.image_index == image)).sum(dim=1)  # (B,)
            if int(count.max()) == 0:
                continue
            budget = torch.tensor(
                [settings.budget(int(n)) if int(n) > 0 else 0 for n in original.tolist()],
                device=weighted.device,
            )
            limit = count
            if cut_to_unpadded and stage > 0:  # the cut may have left fewer tokens: check the budgets' order
                limit = torch.tensor(
                    [self.stages[stage - 1].budget(int(n)) if int(n) > 0 else 0 for n in original.tolist()],
                    device=weighted.device,
                )
            if bool((budget > limit).any()):
                largest = int(limit.max())
                if stage == 0:
                    raise ValueError(
                        f"strategy.keep={settings.keep} is larger than the {largest} prunable image tokens "
                        f"of an image; use keep <= {largest}, or strategy.ratio for a share of each image"
                    )
                raise ValueError(
                    f"pruning stage {stage} (before layer {settings.layer}) would keep "
                    f"{int(budget.max())} tokens of an image that has {largest} left after the previous "
                    f"stage; budgets must not grow from stage to stage"
                )
            if cut_to_unpadded:  # rank the unpadded only: fewer of them than the budget cuts the budget
                in_image = ranked_among & (layout.image_index == image)  # (B, N)
            ranked = torch.where(in_image, weighted, torch.full_like(weighted, float("-inf")))
            # A stable descending sort breaks ties towards the earlier token, so the choice is reproducible.
            order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N)
            rank = torch.empty_like(order).scatter_(1, order, slot.expand_as(order))
            kept |= in_image & (rank < budget[:, None])
        return kept, weighted

    def _padding_weights(self, layout: VisualLayout) -> torch.Tensor:
        """(B, N) 0 for tokens that lie mostly in the pad-to-square border, 1 elsewhere."""
        sizes = self._image_sizes
        batch = layout.seq_index.shape[0]
        if sizes is None or len(sizes) != batch:
            raise ValueError(
                "prior.suppress_padding needs each image's original (height, width): call "
                "pruner.set_image_sizes([[(h, w), ...] per sample]) before the forward"
            )
        weights = torch.ones(layout.seq_index.shape, dtype=torch.float64)
        image_index, grid_h, grid_w = layout.image_index.cpu(), layout.grid_h.cpu(), layout.grid_w.cpu()
        raster, in_grid = layout.raster.cpu(), (layout.valid & layout.prunable).cpu()
        for b, sample_sizes in enumerate(sizes):
            for i, (height, width) in enumerate(sample_sizes):
                tokens = in_grid[b] & (image_index[b] == i)
                if not bool(tokens.any()):
                    raise ValueError(f"sample {b} has no image {i}, but an image size was given for it")
                h, w = int(grid_h[b][tokens][0]), int(grid_w[b][tokens][0])
                fraction = padding_fraction(h, w, height, width)[raster[b][tokens]]
                weights[b, tokens] = (fraction <= self.strategy.prior.pad_threshold).double()
        return weights

    def _prune_prompt(self, stage: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Drop the unselected visual tokens from the stage layer's inputs; returns the kept hidden states."""
        prefill = self._prefill
        if prefill.stage != stage:
            raise RuntimeError(f"pruning stage {stage} ran before stage {prefill.stage}")
        inputs = self._scoring_inputs(stage, prefill)
        kept_visual, weighted = self._select(stage, inputs)
        hidden, kept_visual = self.method.recycle(inputs, hidden, kept_visual, weighted)
        batch, length = prefill.current_padding.shape

        # (B, L_cur) which current positions survive: every non-visual token, and the kept visual ones.
        dropped = prefill.alive & ~kept_visual
        keep = torch.ones(batch, length + 1, dtype=torch.bool, device=hidden.device)
        keep.scatter_(1, torch.where(dropped, prefill.position, length), False)
        keep = keep[:, :length]
        pruned_length = int(keep.sum(dim=1).max())
        # Kept positions in order, right-aligned; samples that keep fewer tokens are left-filled with dropped
        # positions that are masked out like left padding (only when images per sample differ).
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, length - pruned_length :]  # (B, L')
        slot_is_kept = keep.gather(1, order)  # (B, L')
        pruned_padding = prefill.current_padding.gather(1, order) & slot_is_kept  # (B, L')

        pruned_hidden = gather_sequence(hidden, order, seq_dim=1)  # (B, L', D)
        if self.positions == "compact":
            position_embeddings, position_ids = self._compact_positions(
                stage, prefill, kwargs, pruned_hidden, keep, order
            )
        else:
            # Later stages gather from what the previous stage handed its layers, not from the full sequence.
            source = self._pruned_inputs if stage > 0 else None
            cos, sin = source.position_embeddings if source is not None else kwargs["position_embeddings"]
            position_embeddings = (
                gather_sequence(cos, order, seq_dim=cos.dim() - 2),
                gather_sequence(sin, order, seq_dim=sin.dim() - 2),
            )
            position_ids = source.position_ids if source is not None else kwargs.get("position_ids")
            if position_ids is not None and not self._uses_flash_attention():
                position_ids = gather_sequence(position_ids, order, seq_dim=position_ids.dim() - 1)
            else:
                # FlashAttention reads non-contiguous position ids as packed sequences; the mask says it all.
                position_ids = None
        cache = compat.cache_from(kwargs)
        layer = self.stages[stage].layer
        self._pruned_inputs = _PrunedLayerInputs(
            self._pruned_mask(pruned_hidden, pruned_padding, cache, layer), position_embeddings, position_ids
        )

        # Where the surviving visual tokens now sit: their rank among the kept slots of the current sequence.
        kept_count = keep.sum(dim=1, keepdim=True)  # (B, 1): sample b's kept tokens fill its last slots
        new_position = torch.cumsum(keep.long(), dim=1) - 1 + (pruned_length - kept_count)  # (B, L_cur)
        prefill.position = torch.where(kept_visual, new_position.gather(1, prefill.position), 0)
        prefill.alive = kept_visual
        prefill.origin = prefill.origin.gather(1, order)
        prefill.current_padding = pruned_padding
        prefill.stage_kept.append(kept_visual)
        prefill.stage_scores.append(weighted)
        prefill.stage = stage + 1
        prefill.last_token_attention = prefill.text_attention = prefill.text_valid = None
        prefill.text_positions = None

        if stage == 0:
            self._sequence = _Sequence(prefill.input_ids.shape[1], [], cache)
        self._sequence.stage_padding.append(pruned_padding)
        removed = prefill.padding_mask.sum(dim=1) - pruned_padding.sum(dim=1)  # (B,) real tokens removed
        self._sequence.stage_removed.append(removed)
        if stage == len(self.stages) - 1:
            self._record(prefill)
        return pruned_hidden

    def _decoding_inputs(self, stage: int, hidden: torch.Tensor, kwargs: dict) -> _PrunedLayerInputs:
        """Mask for a stage's layers at a decoding step: its pruned prompt mask + the new tokens' mask."""
        sequence = self._sequence
        layer = self.stages[stage].layer
        prompt_padding = sequence.stage_padding[stage]
        cache = compat.cache_from(kwargs)
        full_mask = self._language_model_padding_mask
        if full_mask is None:
            # The layer has not cached this step's tokens yet: it will hold its past plus the new queries.
            kv_length = cache.get_seq_length(layer) + hidden.shape[1]
            new_tokens = kv_length - prompt_padding.shape[1]
            new_mask = torch.ones(hidden.shape[0], new_tokens, dtype=torch.bool, device=hidden.device)
        else:
            new_mask = full_mask[:, sequence.prompt_length :].bool()
        padding = torch.cat([prompt_padding, new_mask], dim=1)
        mask = self._pruned_mask(hidden, padding, cache, layer)
        if self.positions == "compact":
            return _PrunedLayerInputs(mask, *self._compact_decoding_positions(stage, hidden, kwargs))
        return _PrunedLayerInputs(mask, None, kwargs.get("position_ids"))

    # ------------------------------------------------------------------ compact positions

    def _compact_positions(
        self,
        stage: int,
        prefill: _Prefill,
        kwargs: dict,
        pruned_hidden: torch.Tensor,
        keep: torch.Tensor,
        order: torch.Tensor,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """(cos, sin) and position ids of the kept slots `order` (B, L') when the kept sequence is renumbered:
        each kept token's position drops by the number of real tokens this stage removes before it."""
        current = prefill.current_positions
        if current is None:  # the full layers' positions (the language model always hands them on)
            position_ids = kwargs.get("position_ids")
            if position_ids is None or position_ids.dim() != 2:
                raise NotImplementedError(
                    "strategy.positions=compact needs the language model to hand its decoder layers 1-D "
                    "position ids (batch, length); use strategy.positions=original"
                )
            current = position_ids.expand(keep.shape[0], -1)
        removed = prefill.current_padding & ~keep  # (B, L_cur) real tokens this stage drops
        removed_before = torch.cumsum(removed.long(), dim=1).gather(1, order)  # (B, L')
        positions = current.gather(1, order) - removed_before  # (B, L')
        prefill.current_positions = positions
        cos, sin = self.adapter.language_model().rotary_emb(pruned_hidden, positions)
        # FlashAttention reads position ids that restart in a row as packed sequences; the mask says it all.
        return (cos, sin), (None if self._uses_flash_attention() else positions)

    def _compact_decoding_positions(
        self, stage: int, hidden: torch.Tensor, kwargs: dict
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(cos, sin) and position ids of a decoding step's new tokens in a compacted stage: their position in
        the full layers minus the real prompt tokens the stages so far removed."""
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.dim() != 2:
            raise NotImplementedError(
                "strategy.positions=compact needs 1-D position ids at decoding steps; use "
                "strategy.positions=original"
            )
        removed = self._sequence.stage_removed[stage].to(position_ids.device)  # (B,)
        positions = position_ids.expand(hidden.shape[0], -1) - removed[:, None]  # (B, T)
        return self.adapter.language_model().rotary_emb(hidden, positions), positions

    def _pruned_mask(
        self, hidden: torch.Tensor, padding: torch.Tensor, cache: Cache | None, layer: int
    ) -> Any:
        """The causal + padding mask of the pruned layers, in the format of the model's attention backend."""
        return compat.causal_mask(self.adapter.language_model().config, hidden, padding, cache, layer)

    def _uses_flash_attention(self) -> bool:
        return "flash" in (self.adapter.language_model().config._attn_implementation or "")

    def _record(self, prefill: _Prefill) -> None:
        layout = prefill.layout
        n_layers = len(self.layers)
        visual_before = layout.valid.sum(dim=1)  # (B,)
        real_before = prefill.padding_mask.sum(dim=1)
        visual = visual_before.expand(n_layers, -1).clone()  # (layers, B)
        for stage, kept in zip(self.stages, prefill.stage_kept, strict=True):
            visual[stage.layer :] = (layout.valid & kept).sum(dim=1)
        self._image_sizes = None
        self.last_record = PruningRecord(
            layer=self.stages[0].layer,
            layout=layout,
            kept=prefill.stage_kept[-1],
            scores=prefill.stage_scores[0],
            visual_tokens=visual,
            sequence_lengths=real_before - (visual_before - visual),
            stage_layers=[stage.layer for stage in self.stages],
            stage_kept=list(prefill.stage_kept),
            stage_scores=list(prefill.stage_scores),
        )
