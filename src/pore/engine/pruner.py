"""The pruning engine: drop image tokens between decoder layers of a transformers VLM, through hooks.

How one prefill runs with a pruner attached (K = a stage's `strategy.layer`; one stage for FastV and PoRe,
several for PyramidDrop):

1. A forward pre-hook on the multimodal wrapper reads `input_ids` (and `image_sizes` / `image_grid_thw`).
   If the method asked to see the vision tower, its captures (`pore.engine.observe`) come in as the tower
   runs (inside that forward, or before it: generate() may encode the images first).
2. A forward pre-hook on the language model decides prefill vs continuation (from the KV cache), keeps
   the 2-D padding mask, and for a prompt lets the model adapter locate the visual tokens and their
   (row, col) in their image grid; the vision captures and the prompt's embeddings the method asked for
   become per-token tensors.
3. Before pruning point K, the observer's captures of the decoder run as the layers do: in layer K-1, the
   attention tap (`pore.engine.tap`) computes the rows of attention the method needs (the last prompt
   token's, or the text tokens') from the query/key states, while SDPA / FlashAttention / eager runs
   unchanged (PyramidDrop's official `score_from=own_layer`: in an extra no-cache call of layer K's own
   input norm + attention module on layer K's input, by the layer-K hook); earlier layers' inputs or keys
   the same way when asked for.
4. A forward pre-hook on decoder layer K runs the stage (`pore.engine.stage`): it scores the visual tokens
   still in the sequence (method x prior), keeps the top `keep` of each image (`pore.engine.selection`),
   lets the method rewrite or replace the kept tokens (`recycle`: pooling, merging), gathers the hidden
   states, RoPE embeddings and position ids of the kept tokens (which keep their original positions) and
   builds the attention mask for the shorter sequence (`pore.engine.surgery`). Pre-hooks on the later layers
   hand them the same pruned mask and embeddings, until the next stage shortens them again.

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
behaviour). 3-D M-RoPE models (Qwen2-VL) keep `original` (`Strategy.resolve`).

The forward's outputs (logits, hidden states) cover the kept sequence: text tokens plus kept image tokens in
their original order. What each prefill did is in `Pruner.last_record`.

The hooks' contract. The hooks talk only through the pruner's `HookState` (`S`, `pore.engine.state`): each
object there is created by one hook and consumed by a later one.

| hook (module, kind)      | reads                               | writes                                    |
|--------------------------|-------------------------------------|-------------------------------------------|
| `_on_multimodal`         | `input_ids`, the image arguments    | `S.incoming`: input_ids, image_inputs     |
| (multimodal wrapper,     | (`image_sizes`, `image_grid_thw`,   | (created here unless the vision tower     |
| pre-hook)                | ...)                                | ran first)                                |
|                          |                                     |                                           |
| observer, vision tower   | hidden / query / key states         | `S.incoming.vision`                       |
| (encoder layers, their   |                                     |                                           |
| attention)               |                                     |                                           |
|                          |                                     |                                           |
| `_on_language_model`     | `S.incoming` (consumed),            | `S.forward` (`LanguageForward`): a        |
| (language model,         | `inputs_embeds`, `attention_mask`,  | `Prefill` with the layout and the         |
| pre-hook)                | the cache, `position_ids`, the      | prompt's observations, or a decoding      |
|                          | sizes of `set_image_sizes`          | step; a new prompt drops `S.prompt`       |
|                          |                                     |                                           |
| observer, decoder (layer | hidden / key states, attention      | `S.forward.prefill.stage_captures`        |
| K+offset, its attention) | rows                                | (for the stage whose turn it is)          |
|                          |                                     |                                           |
| `_on_pruning_layer`      | prefill: `S.forward.prefill` and    | prefill: the layer's hidden states (the   |
| (layer K of each stage,  | its captures, the layer's input     | kept ones), `S.forward.layer_inputs`,     |
| pre-hook)                | and kwargs; decoding: `S.prompt`,   | the prefill's alive, position, origin,    |
|                          | `S.forward.padding_mask`            | stage; `S.prompt` (created at stage 0);   |
|                          |                                     | `last_record` after the last stage;       |
|                          |                                     | decoding: `S.forward.layer_inputs`        |
|                          |                                     |                                           |
| `_on_pruned_layer`       | `S.forward.layer_inputs`; at a      | the layer's `attention_mask`,             |
| (every layer from the    | prompt the prefill's `origin`       | `position_embeddings`, `position_ids`; at |
| first K on, pre-hook)    |                                     | a prompt its per-token argument gathered  |
|                          |                                     | at the kept tokens, and the last Q rows   |
|                          |                                     | for a layer run on Q queries only         |
|                          |                                     | (`pore.engine.layer_inputs`, Gemma 4)     |
|                          |                                     |                                           |
| `_on_layout_module`      | the arguments the layout needs      | `S.incoming.image_inputs` (when generate()|
| (`adapter.layout_inputs`,| (Gemma 4's patch positions)         | encoded the images before the forward)    |
| pre-hook)                |                                     |                                           |
|                          |                                     |                                           |
| `_after_language_model`  | `S.forward` (consumed)              | nothing; a tripwire if a prompt or a      |
| (language model,         |                                     | step went through without being pruned    |
| forward hook)            |                                     |                                           |
"""

from __future__ import annotations

from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from pore import compat
from pore.adapters import ModelAdapter, adapter_for
from pore.engine.layer_features import LayerFeatureAdder
from pore.engine.layer_inputs import layer_per_token_inputs
from pore.engine.observe import Observer
from pore.engine.record import PruningRecord
from pore.engine.rerank import kept_raster
from pore.engine.stage import StageRunner
from pore.engine.state import HookState, IncomingCall, LanguageForward, Prefill, PromptFeatures
from pore.engine.tap import Tap
from pore.methods import METHODS
from pore.strategy import Strategy

# The pruner attached to each model: two would fight over the same hooks and attention implementation.
_ATTACHED: WeakKeyDictionary[nn.Module, Pruner] = WeakKeyDictionary()


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
        self._tap = Tap(model)
        self._state = HookState()
        self._check_supported()
        config = self.adapter.language_model().config
        self._layer_kind = {layer: compat.layer_type(config, i) for i, layer in enumerate(self.layers)}
        self._observer = Observer(self.adapter, self.method.observations(), self.stages, self._state)
        self._runner = StageRunner(self.adapter, self.strategy, self.method, self._observer)
        self._observer.capture_decoding = self._runner.rerank

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
        layout_inputs = self.adapter.layout_inputs()
        if layout_inputs is not None:  # arguments of another module the layout reads (Gemma 4's patch grid)
            module, names = layout_inputs
            hook = partial(self._on_layout_module, names)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if self.adapter.adds_layer_features:  # DeepStack: added to the tokens that survive, after each layer
            self._handles += LayerFeatureAdder(self._state).attach(self.layers)
        # After the pruner's own hooks: a capture of a layer's input sees what the pruner hands the layer.
        self._handles += self._observer.attach(self._tap)

    def detach(self) -> None:
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._tap.release()
        self._state.clear()

    def __enter__(self) -> Pruner:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    @property
    def reranked(self) -> list[list[list[list[int]]]]:
        """With `strategy.options.rerank=every_token` (FastV's official mask): for the prompt and each
        decoding step since, per sample, per image, the raster ids the pruned layers could attend to; else
        []."""
        prompt = self._state.prompt
        if prompt is None or prompt.rerank is None:
            return []
        return [kept_raster(prompt.rerank.layout, kept) for kept in prompt.rerank.history]

    def set_image_sizes(self, sizes: list[list[tuple[int, int]]] | None) -> None:
        """Original (height, width) of every image, per sample, for the next prefill: padding suppression,
        and the layout of families whose token count depends on the size (LLaVA-NeXT) when generate()
        does not hand `image_sizes` to the forward."""
        self._image_sizes = sizes

    def set_texts(self, texts: list[str] | None) -> None:
        """The instruction text of every sample, for the next prefill: what instruction-conditioned methods
        (CDPruner) rank the image tokens against (`ScoringInputs.texts`). The pipeline hands each batch's
        questions; from Python, call it before `generate()`."""
        self._runner.texts = texts

    def _check_supported(self) -> None:
        config = self.adapter.language_model().config
        layer_types = getattr(config, "layer_types", None) or []
        unknown = sorted(set(layer_types) - set(compat.MASKED_LAYER_TYPES))
        if unknown:
            raise NotImplementedError(
                f"pruning supports decoder layers with {' or '.join(compat.MASKED_LAYER_TYPES)}; this "
                f"language model also has {unknown}"
            )

    # ------------------------------------------------------------------ hooks

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._state.call()  # keeps what the vision tower reported if generate() encoded images first
        call.input_ids = kwargs.get("input_ids", args[0] if args else None)
        # What the adapter may need to place the visual tokens (image_sizes, image_grid_thw, ...), on top of
        # what the vision tower's hook kept of its own arguments (`ModelAdapter.layout_inputs`).
        given = {key: value for key, value in kwargs.items() if key != "input_ids"}
        kept = {key: value for key, value in call.image_inputs.items() if given.get(key) is None}
        call.image_inputs = {**given, **kept}

    def _on_layout_module(self, names: dict[str, str], module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the arguments of a module (Gemma 4's vision tower: the patch positions) that the layout needs
        and that generate() no longer hands the multimodal forward once it has encoded the images itself."""
        call = self._state.call()
        kept = {key: kwargs[name] for name, key in names.items() if kwargs.get(name) is not None}
        call.image_inputs = {**call.image_inputs, **kept}

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # What the multimodal wrapper and the vision tower saw of this forward is consumed here.
        call = self._state.incoming or IncomingCall()
        self._state.incoming = self._state.forward = None
        # Features the language model would add after its first layers (DeepStack) to a (B, L) set of
        # positions that pruning changes: the engine adds them to the surviving tokens instead.
        kwargs, layer_features = self.adapter.take_layer_features(kwargs)
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
        if isinstance(padding_mask, dict):
            # Masks prepared per layer kind by the multimodal model (Gemma 3): the padding is the 2-D mask
            # the model itself was called with.
            padding_mask = call.image_inputs.get("attention_mask")
        if padding_mask is not None and padding_mask.dim() != 2:
            raise NotImplementedError(
                "the pruner needs a 2-D padding mask (batch, length), not a prepared 4-D mask"
            )
        forward = LanguageForward(padding_mask)
        if cache is not None and cache.get_seq_length() > 0:  # continuation: decoding steps
            self._check_continuation(call, cache)
            forward.decoding = True
        else:
            forward.prefill = self._new_prefill(call, kwargs, embeds, padding_mask)
            self._state.prompt = None
        if layer_features is not None:
            forward.layer_features = PromptFeatures.of(layer_features)
        self._state.forward = forward
        return (args, kwargs) if layer_features is not None else None

    def _check_continuation(self, call: IncomingCall, cache: DynamicCache) -> None:
        if self._state.prompt is None or self._state.prompt.cache is not cache:
            raise RuntimeError("a cached continuation reached the pruner without its prefill")
        # New images at a decoding step (multi-turn with a cache); an image token id that a model generates
        # without pixels is only a token.
        has_pixels = any(
            call.image_inputs.get(key) is not None for key in ("pixel_values", "pixel_values_videos")
        )
        if (
            has_pixels
            and call.input_ids is not None
            and bool(self.adapter.visual_token_mask(call.input_ids).any())
        ):
            raise NotImplementedError(
                "image tokens after the prefill (multi-turn with a cache) are not supported"
            )

    def _new_prefill(
        self, call: IncomingCall, kwargs: dict, embeds: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> Prefill:
        """The state of a fresh prompt: its layout, and what the method sees of it before any layer."""
        batch, length = embeds.shape[:2]
        position_ids, input_ids = kwargs.get("position_ids"), call.input_ids
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
        image_inputs = call.image_inputs
        if image_inputs.get("image_sizes") is None and self._image_sizes is not None:
            # generate() may encode the images before the prefill and keep `image_sizes` from the forward
            # (transformers >= 5.23); the sizes given to set_image_sizes stand in for them.
            sizes = [size for sample in self._image_sizes for size in sample]
            image_inputs = {**image_inputs, "image_sizes": torch.tensor(sizes, device=input_ids.device)}
        layout = self.adapter.visual_layout(input_ids, image_inputs)
        observed, views = self._observer.prompt_observations(
            call, layout, image_inputs, embeds, padding_mask, input_ids
        )
        return Prefill(
            input_ids=input_ids,
            padding_mask=padding_mask,
            layout=layout,
            alive=layout.valid.clone(),
            position=layout.seq_index.clone(),
            origin=torch.arange(length, device=input_ids.device).expand(batch, length),
            current_padding=padding_mask,
            prompt_observations=observed,
            vision_views=views,
            block_ids=self.adapter.bidirectional_blocks(input_ids, image_inputs),
        )

    def _after_language_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        forward, self._state.forward = self._state.forward, None
        if output is None or forward is None:  # the forward raised; its own error says what went wrong
            return
        prefill = forward.prefill
        if prefill is not None and prefill.stage < len(self.stages) and bool(prefill.layout.valid.any()):
            layer = self.stages[prefill.stage].layer
            raise compat.PruningTripwire(
                f"a prompt with image tokens went through the language model without being pruned: the "
                f"hook on decoder layer {layer} did not run (stage {prefill.stage} of {len(self.stages)})"
            )
        if forward.decoding and forward.layer_inputs is None:
            raise compat.PruningTripwire(
                f"a decoding step went through the language model without the pruned layers' mask: the "
                f"hook on decoder layer {self.stages[0].layer} did not run"
            )

    def _on_pruning_layer(
        self, stage: int, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        forward = self._state.forward
        hidden = args[0] if args else kwargs.get("hidden_states")
        if forward is not None and forward.prefill is not None:

            def layer_kwargs() -> dict:  # what the layer receives for the current sequence
                return (self._on_pruned_layer(module, args, kwargs) or (args, kwargs))[1]

            self._observer.before_pruning(stage, module, hidden, layer_kwargs)
            hidden, record = self._runner.prune_prompt(stage, self._state, hidden, kwargs, self._image_sizes)
            if record is not None:
                self.last_record, self._image_sizes, self._runner.texts = record, None, None
            args, kwargs = (
                ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
            )
        elif forward is not None and forward.decoding:
            forward.layer_inputs = self._runner.decoding_inputs(stage, self._state, hidden, kwargs)
        return self._on_pruned_layer(module, args, kwargs) or (args, kwargs)

    def _on_pruned_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        forward = self._state.forward
        pruned = forward.layer_inputs if forward is not None else None
        if pruned is None:
            return None
        kind = self._layer_kind[module]  # the mask and RoPE of the layer's kind (full / sliding window)
        kwargs = {**kwargs, "attention_mask": pruned.attention_mask[kind]}
        if pruned.position_embeddings is not None:
            kwargs["position_embeddings"] = pruned.position_embeddings[kind]
        if "position_ids" in kwargs:
            kwargs["position_ids"] = pruned.position_ids
        prefill = forward.prefill
        if prefill is not None:  # a prompt: per-token arguments follow the kept tokens
            args, kwargs = layer_per_token_inputs(self.adapter, prefill, args, kwargs)
        return args, kwargs
