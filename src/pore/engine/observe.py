"""The engine's side of the observation requests (`pore.methods.requests`): capture what a method asked for,
nothing else, and hand it over per visual token.

| request               | captured by                                        | kept in                       |
|-----------------------|----------------------------------------------------|-------------------------------|
| `LastTokenAttention`, | the tap on layer K-1's attention (own layer:       | `Prefill.stage_captures`      |
| `TextAttention`,      | on layer K's, run once more by `before_pruning`);  |                               |
| `ImageAttention`      | a request with a `stage` only at that stage        |                               |
| `DecoderHiddenStates` | a pre-hook on layer K+offset (offset 0: the        | `Prefill.stage_captures`      |
|                       | pruning hook's input, `before_pruning`)            |                               |
| `DecoderKeys`         | the tap on layer K+offset's attention              | `Prefill.stage_captures`      |
| `VisionHiddenStates`  | a pre-hook on encoder layer j (a forward hook on   | `IncomingCall.vision`         |
|                       | the last layer for the last hidden states)         |                               |
| `VisionAttention`     | the tap on encoder layer j's attention ([CLS] row) | `IncomingCall.vision`         |
| `VisionKeys`          | the tap on encoder layer j's attention (keys)      | `IncomingCall.vision`         |
| `ImageEmbeddings`,    | the language model's pre-hook (`inputs_embeds`)    | `Prefill.prompt_observations` |
| `TextEmbeddings`,     |                                                    |                               |
| `PromptEmbeddings`    |                                                    |                               |

Captures of the vision tower are per encoder position, (views, L_v, ...); `prompt_observations` gathers them
per visual token through the adapter's `vision_token_index` when the prompt's layout is known. Decoder
captures hold the current sequence of the stage they serve (a capture from another stage, or from a decoding
step, is ignored); `scoring_inputs` gathers them per visual token. Each stage clears its captures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from pore.adapters import ModelAdapter, VisualLayout
from pore.adapters.base import VisionEncoder, tokens_from_positions, views_from_index
from pore.engine.state import HookState, IncomingCall, Prefill
from pore.engine.tap import Tap, cls_attention, query_attention
from pore.methods import ScoringInputs
from pore.methods.requests import (
    ATTENTION_REQUESTS,
    DECODER_REQUESTS,
    VISION_REQUESTS,
    DecoderHiddenStates,
    DecoderKeys,
    ImageAttention,
    ImageEmbeddings,
    ImageRows,
    LastTokenAttention,
    PromptEmbeddings,
    Request,
    TextAttention,
    TextEmbeddings,
    TextRows,
    TextTokens,
    VisionAttention,
    VisionHiddenStates,
)
from pore.strategy import PruningStage


def text_slots(
    layout: VisualLayout, input_ids: torch.Tensor, padding: torch.Tensor, origin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q) positions of the real text tokens of a sequence whose slots come from the prompt positions
    `origin` (B, L_cur) (`padding` (B, L_cur): its real tokens), left-aligned, and (B, Q) bool: valid."""
    visual = torch.zeros_like(input_ids, dtype=torch.bool)  # (B, L)
    visual.scatter_(1, layout.seq_index, layout.valid)
    is_text = padding & ~visual.gather(1, origin)  # (B, L_cur)
    count = int(is_text.sum(dim=1).max())
    order = torch.argsort((~is_text).to(torch.int8), dim=1, stable=True)[:, :count]  # (B, Q)
    return order, is_text.gather(1, order)


def visual_queries(
    alive: torch.Tensor, position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The visual tokens still in the sequence as queries, left-aligned: (B, Q) their slot n, (B, Q) bool
    valid, (B, Q) long their position in the current sequence (0 for padding of the Q axis); from `alive`
    (B, N) and the current `position` (B, N)."""
    count = int(alive.sum(dim=1).max()) if alive.numel() else 0
    tokens = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :count]  # (B, Q)
    valid = alive.gather(1, tokens)
    return tokens, valid, position.gather(1, tokens).masked_fill(~valid, 0)


def tokens_of_sequence(values: torch.Tensor, position: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) the rows of `values` (B, L_cur, ...) at each visual token's `position` (B, N); zeros for
    tokens that are not `alive` (B, N)."""
    index = position.view(*position.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    rows = values.gather(1, index)
    missing = (~alive).view(*alive.shape, *([1] * (values.dim() - 2)))
    return rows.masked_fill(missing, 0)


def rerun_attention(attention: nn.Module, normed: torch.Tensor, kwargs: dict) -> None:
    """Run a decoder layer's attention module once more on its normed input (B, L, D) with what the layer
    received (`kwargs`), without the cache: its keyword moves between releases, and its default (None) is
    what a re-run wants. Arguments the attention cannot do without that the layer received are passed on
    (Gemma 4's `shared_kv_states`)."""
    given = {
        "hidden_states": normed,
        "attention_mask": kwargs.get("attention_mask"),
        "position_embeddings": kwargs["position_embeddings"],
        "position_ids": kwargs.get("position_ids"),
    }
    required = [
        name
        for name, parameter in inspect.signature(attention.forward).parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in given and name in kwargs
    ]
    attention(**given, **{name: kwargs[name] for name in required})


class Observer:
    """Captures the requests of one method on one model, for the pruner that owns `state`."""

    def __init__(
        self,
        adapter: ModelAdapter,
        requests: Sequence[Request],
        stages: Sequence[PruningStage],
        state: HookState,
    ) -> None:
        self.adapter = adapter
        self.requests = tuple(requests)
        self.layers = [stage.layer for stage in stages]
        self.state = state
        self.vision_keys: dict[Request, tuple[str, int]] = {}  # request -> capture key (kind, layer)
        self.encoder: VisionEncoder | None = None
        self.capture_decoding = False  # last-token rows at decoding steps too (FastV's re-ranking)
        self._check_decoder_layers(len(adapter.decoder_layers()))

    # ------------------------------------------------------------------ checks and set-up

    def _check_decoder_layers(self, num_layers: int) -> None:
        """Every decoder request must read a layer that ran on the sequence its stage prunes."""
        for request in self.requests:
            if not isinstance(request, DECODER_REQUESTS):
                continue
            for stage, layer in enumerate(self.layers):
                first = self.layers[stage - 1] if stage else 0
                if not first <= layer + request.offset < num_layers:
                    raise ValueError(
                        f"{request} reads decoder layer {layer + request.offset} for the stage before layer "
                        f"{layer}, but that stage prunes the sequence layers {first}..{layer} see; move the "
                        f"stages apart or read a later layer"
                    )

    def _vision_encoder(self, request: Request) -> VisionEncoder:
        try:
            encoder = self.adapter.vision_encoder()
        except NotImplementedError:
            if isinstance(request, VisionAttention):  # no encoder position to map a [CLS] row to
                encoder = None
            else:
                raise
        if isinstance(request, VisionAttention) and (encoder is None or not encoder.has_cls):
            raise NotImplementedError(
                f"the {self.adapter.name} adapter has no vision [CLS] attention to score with; choose a "
                f"method that scores with the language model's attention"
            )
        return encoder

    def attach(self, tap: Tap) -> list[Any]:
        """Install the captures (after the pruner's own hooks, so that a layer's input hook sees what the
        pruner hands the layer); returns the hook handles. Attention captures go through `tap`."""
        handles: list[Any] = []
        decoder_layers = self.adapter.decoder_layers()
        language_config = self.adapter.language_model().config
        installed: set[tuple] = set()  # requests that differ only in how they are delivered share a capture
        for request in self.requests:
            if isinstance(request, VISION_REQUESTS):
                handles += self._attach_vision(request, tap, installed)
                continue
            for stage, layer in enumerate(self.layers):
                if isinstance(request, ATTENTION_REQUESTS):
                    if not request.serves(stage):
                        continue
                    scoring_layer = layer if request.own_layer else layer - 1
                    module = self.adapter.attention_module(decoder_layers[scoring_layer])
                    tap.switch(language_config)
                    tap.watch(module, partial(self._on_rows, request, stage))
                    continue
                if not isinstance(request, DECODER_REQUESTS):  # the embeddings: the language model's hook
                    break
                key = ("hidden" if isinstance(request, DecoderHiddenStates) else "keys", request.offset)
                if (key, stage) in installed or key == ("hidden", 0):  # offset 0: `before_pruning`
                    continue
                installed.add((key, stage))
                if isinstance(request, DecoderKeys):
                    module = self.adapter.attention_module(decoder_layers[layer + request.offset])
                    tap.switch(language_config)
                    tap.watch(module, partial(self._on_decoder_keys, key, stage))
                else:
                    hook = partial(self._on_decoder_input, key, stage)
                    module = decoder_layers[layer + request.offset]
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def _attach_vision(self, request: Request, tap: Tap, installed: set[tuple]) -> list[Any]:
        encoder = self.encoder = self._vision_encoder(request)
        if isinstance(request, VisionHiddenStates):
            index = encoder.hidden_states_index(request.layer)
            key = self.vision_keys[request] = ("hidden", index)
            if key in installed:
                return []
            installed.add(key)
            store = partial(self._store_vision, key)
            if index < len(encoder.layers):  # hidden_states[j] is what encoder layer j receives
                hook = encoder.layers[index].register_forward_pre_hook(
                    lambda module, args, kwargs: store(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            else:  # the last hidden states come out of the last layer
                hook = encoder.layers[-1].register_forward_hook(
                    lambda module, args, output: store(output[0] if isinstance(output, tuple) else output)
                )
            return [hook]
        index = encoder.layer_index(request.layer)
        kind = "keys"
        if isinstance(request, VisionAttention):
            kind = "cls" if request.heads == "mean" else "cls_joint"
        key = self.vision_keys[request] = (kind, index)
        if key in installed:
            return []
        installed.add(key)
        tap.switch(encoder.config)
        tap.watch(encoder.layers[index].self_attn, partial(self._on_vision_attention, key))
        return []

    # ------------------------------------------------------------------ captures

    def _store_vision(self, key: tuple[str, int], value: torch.Tensor) -> None:
        self.state.call().vision[key] = value

    def _on_vision_attention(
        self, key: tuple[str, int], query: torch.Tensor, keys: torch.Tensor, mask: Any, scaling: float
    ) -> None:
        if key[0] == "cls":  # (views, L_v): the encoder is bidirectional
            self._store_vision(key, cls_attention(query, keys, mask, scaling))
        elif key[0] == "cls_joint":  # the heads as one: (views, 1, L_v, H * d)
            query, keys = (states.transpose(1, 2).flatten(2)[:, None] for states in (query, keys))
            self._store_vision(key, cls_attention(query, keys, mask, query.shape[-1] ** -0.5))
        else:  # (views, L_v, H, d)
            self._store_vision(key, keys.transpose(1, 2))

    def _stage_prefill(self, stage: int) -> Prefill | None:
        """The prompt in flight if it is at `stage` (None at decoding steps and for other stages)."""
        prefill = self.state.prefill()
        return prefill if prefill is not None and prefill.stage == stage else None

    def _on_rows(
        self, request: Request, stage: int, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float
    ) -> None:
        prefill = self._stage_prefill(stage)
        if prefill is None:
            forward = self.state.forward  # a decoding step: only FastV's official re-ranking reads it
            if self.capture_decoding and forward is not None and forward.decoding:
                forward.decoding_rows = query_attention(query, key, mask, scaling)[:, 0]  # (B, L_total)
            return
        if isinstance(request, LastTokenAttention):
            prefill.stage_captures[request] = query_attention(query, key, mask, scaling)[:, 0]  # (B, L_cur)
            return
        if isinstance(request, ImageAttention):
            tokens, valid, positions = visual_queries(prefill.alive, prefill.position)  # (B, Q)
            attention = query_attention(query, key, mask, scaling, positions)  # (B, Q, L_cur)
            prefill.stage_captures[request] = ImageRows(attention * valid[..., None], valid, tokens)
            return
        positions, valid = text_slots(
            prefill.layout, prefill.input_ids, prefill.current_padding, prefill.origin
        )
        attention = query_attention(query, key, mask, scaling, positions)  # (B, Q, L_cur)
        prefill.stage_captures[request] = TextRows(attention, valid, positions)

    def _on_decoder_keys(
        self, key: tuple, stage: int, query: torch.Tensor, keys: torch.Tensor, mask: Any, scaling: float
    ) -> None:
        prefill = self._stage_prefill(stage)
        if prefill is not None and query.shape[2] == keys.shape[2]:  # the prompt itself, no past
            prefill.stage_captures[key] = keys.transpose(1, 2)  # (B, L_cur, H_kv, d)

    def _on_decoder_input(self, key: tuple, stage: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        prefill = self._stage_prefill(stage)
        if prefill is not None:
            prefill.stage_captures[key] = args[0] if args else kwargs["hidden_states"]  # (B, L_cur, D)

    def before_pruning(
        self, stage: int, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: Callable[[], dict]
    ) -> None:
        """In the pruning hook of `stage`, before it prunes: layer K's input (`hidden`, (B, L_cur, D)), and
        the own-layer attention rows: layer K's input norm and attention module run once more on `hidden`,
        without the cache, so that the tap reports the rows; the output is discarded. `layer_kwargs()`: what
        the layer receives for the current sequence (after an earlier stage, that stage's inputs)."""
        prefill = self._stage_prefill(stage)
        if prefill is None:
            return
        if any(isinstance(r, DecoderHiddenStates) and r.offset == 0 for r in self.requests):
            prefill.stage_captures[("hidden", 0)] = hidden
        if not any(isinstance(r, ATTENTION_REQUESTS) and r.own_layer for r in self.requests):
            return
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise NotImplementedError(
                f"options.score_from=own_layer needs decoder layers with an input_layernorm; "
                f"{type(layer).__name__} has none (use options.score_from=previous_layer)"
            )
        rerun_attention(self.adapter.attention_module(layer), norm(hidden), layer_kwargs())

    # ------------------------------------------------------------------ delivery

    def prompt_observations(
        self,
        call: IncomingCall,
        layout: VisualLayout,
        image_inputs: dict,
        embeds: torch.Tensor,
        padding: torch.Tensor,
        input_ids: torch.Tensor,
    ) -> tuple[dict[Request, Any], torch.Tensor | None]:
        """What does not change from stage to stage, per visual token: the vision tower's captures (through
        the adapter's `vision_token_index`) and the prompt's embeddings (`embeds` (B, L, D)); and (B, N) the
        encoder view of its image each token came from, for families that encode views (else None)."""
        observed: dict[Request, Any] = {}
        index = views = None
        for request, key in self.vision_keys.items():
            if key not in call.vision:
                raise RuntimeError(f"the vision encoder did not report {request}; no pixel_values?")
            if index is None:
                index = self.adapter.vision_token_index(layout, image_inputs)  # (B, N)
                if self.adapter.encodes_views:
                    views = views_from_index(index, layout, self.encoder)
            observed[request] = tokens_from_positions(call.vision[key], index)
        for request in self.requests:
            if isinstance(request, ImageEmbeddings):
                observed[request] = tokens_of_sequence(embeds, layout.seq_index, layout.valid)  # (B, N, D)
            elif isinstance(request, TextEmbeddings):
                origin = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                positions, valid = text_slots(layout, input_ids, padding, origin)  # (B, T)
                observed[request] = TextTokens(tokens_of_sequence(embeds, positions, valid), positions, valid)
            elif isinstance(request, PromptEmbeddings):
                observed[request] = embeds  # (B, L, D)
        return observed, views

    def scoring_inputs(self, prefill: Prefill, stage: int, budget: Callable[[int], int]) -> ScoringInputs:
        """What the method sees at `stage`: the prompt's observations and this stage's captures."""
        observed = dict(prefill.prompt_observations)
        for request in self.requests:
            if isinstance(request, ATTENTION_REQUESTS):
                if not request.serves(stage):
                    continue
                if request not in prefill.stage_captures:
                    layer = self.layers[stage] - (0 if request.own_layer else 1)
                    raise RuntimeError(
                        f"layer {layer} did not report its attention; is the model's forward hooked?"
                    )
                observed[request] = prefill.stage_captures[request]
            elif isinstance(request, DECODER_REQUESTS):
                kind = "hidden" if isinstance(request, DecoderHiddenStates) else "keys"
                captured = prefill.stage_captures.get((kind, request.offset))
                if captured is None:
                    layer = self.layers[stage] + request.offset
                    raise RuntimeError(
                        f"decoder layer {layer} did not report {request}; is the model hooked?"
                    )
                if isinstance(request, DecoderHiddenStates) and request.final_norm:
                    captured = self._final_norm(captured)
                observed[request] = (
                    captured
                    if request.sequence
                    else tokens_of_sequence(captured, prefill.position, prefill.alive)
                )
        return self._with_named_fields(prefill, stage, budget, observed)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L_cur, D) through the language model's final norm (`DecoderHiddenStates(final_norm=True)`)."""
        norm = getattr(self.adapter.language_model(), "norm", None)
        if norm is None:
            raise NotImplementedError(
                f"DecoderHiddenStates(final_norm=True) needs a language model with a final `norm`; "
                f"{type(self.adapter.language_model()).__name__} has none"
            )
        with torch.no_grad():
            return norm(hidden)

    def _with_named_fields(
        self, prefill: Prefill, stage: int, budget: Callable[[int], int], observed: dict[Request, Any]
    ) -> ScoringInputs:
        """ScoringInputs with the first requests also under their older names."""
        layout = prefill.current_layout
        rows = next((observed[r] for r in observed if isinstance(r, TextAttention)), None)
        cls_row = observed.get(VisionAttention())
        prompt = next((observed[r] for r in observed if isinstance(r, PromptEmbeddings)), None)
        return ScoringInputs(
            layout=layout,
            alive=prefill.alive,
            input_ids=prefill.input_ids,
            attention_mask=prefill.padding_mask,
            budget=budget,
            stage=stage,
            last_token_attention=next(
                (observed[r] for r in observed if isinstance(r, LastTokenAttention)), None
            ),
            text_attention=rows.attention if rows is not None else None,
            text_valid=rows.valid if rows is not None else None,
            vision_attention=(
                None
                if cls_row is None
                else torch.where(layout.valid & layout.prunable, cls_row, torch.zeros_like(cls_row)).double()
            ),
            vision_views=prefill.vision_views,
            text_positions=rows.positions if rows is not None else None,
            origin=prefill.origin,
            prompt_seq_index=prefill.layout.seq_index,
            input_embeddings=prompt,
            observations=observed,
        )
