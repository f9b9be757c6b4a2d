"""The pruning engine: drop image tokens between two decoder layers of a transformers VLM, through hooks.

How one prefill runs with a pruner attached (K = `strategy.layer`):

1. A forward pre-hook on the multimodal wrapper reads `input_ids`; the model adapter locates the image
   tokens and their (row, col) in the image grid.
2. A forward pre-hook on the language model decides prefill vs continuation (from the KV cache) and keeps
   the 2-D padding mask.
3. In layer K-1, the scoring attention wrapper (`pore.pruning.attention`) computes the last prompt token's
   attention row from the query/key states, while SDPA / FlashAttention / eager runs unchanged.
4. A forward pre-hook on decoder layer K scores the image tokens (method x prior), keeps the top `keep` of
   each image, gathers the hidden states, RoPE embeddings and position ids of the kept tokens (which keep
   their original positions), and builds the attention mask for the shorter sequence. Pre-hooks on layers
   K+1.. hand them the same pruned mask and embeddings.

Layers below K therefore cache every token, layers from K only the kept ones (a `DynamicCache` holds one
length per layer). At each decoding step the hook on layer K rebuilds the mask of the pruned layers from
the pruned prompt mask plus the new tokens' mask; RoPE positions come from the full layers, so new tokens
get their true positions.

The forward's outputs (logits, hidden states) cover the kept sequence: text tokens plus kept image tokens in
their original order. What each prefill did is in `Pruner.last_record`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask

from pore.adapters import ModelAdapter, VisualLayout, adapter_for
from pore.methods import METHODS, ScoringInputs
from pore.priors import padding_fraction
from pore.pruning import attention as scoring
from pore.pruning.record import PruningRecord
from pore.strategy import Strategy

# The pruner attached to each model: two would fight over the same hooks and attention implementation.
_ATTACHED: WeakKeyDictionary[nn.Module, Pruner] = WeakKeyDictionary()


@dataclass
class _Prefill:
    """State of one forward over a fresh prompt."""

    input_ids: torch.Tensor  # (B, L)
    padding_mask: torch.Tensor  # (B, L) bool, True = real token
    layout: VisualLayout
    last_token_attention: torch.Tensor | None = None  # (B, L), filled in layer K-1


@dataclass
class _PrunedLayerInputs:
    """What every decoder layer from K on receives instead of the language model's own arguments."""

    attention_mask: Any  # in the backend's own format (None, 4-D bool / float, or 2-D)
    position_embeddings: Any  # (cos, sin) of the kept tokens; None = unchanged
    position_ids: torch.Tensor | None


@dataclass
class _Sequence:
    """What decoding steps need from the prefill: how the prompt was shortened."""

    prompt_length: int  # L, tokens of the prompt in the full layers
    pruned_padding_mask: torch.Tensor  # (B, L') bool: real tokens among the pruned prompt's slots
    cache: Cache | None


def _gather_sequence(tensor: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
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
    ...     pruner.last_record.kept_raster  # per sample, per image: raster indices kept
    """

    def __init__(
        self, model: nn.Module, strategy: Strategy, adapter: str | ModelAdapter | None = None
    ) -> None:
        self.model = model
        self.adapter = adapter if isinstance(adapter, ModelAdapter) else adapter_for(model, adapter)
        self.layers = self.adapter.decoder_layers()
        self.strategy = strategy.validate(num_layers=len(self.layers))
        self.method = METHODS.get(strategy.method)(seed=strategy.seed)
        self.last_record: PruningRecord | None = None
        self._image_sizes: list[list[tuple[int, int]]] | None = None
        self._handles: list[Any] = []
        self._watched: nn.Module | None = None
        self._original_attention: str | None = None
        self._pending_input_ids: torch.Tensor | None = None
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
        language_model = self.adapter.language_model()
        self._handles = [
            self.adapter.multimodal_module().register_forward_pre_hook(self._on_multimodal, with_kwargs=True),
            language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
            language_model.register_forward_hook(self._after_language_model, always_call=True),
        ]
        for index in range(self.strategy.layer, len(self.layers)):
            hook = self._on_pruning_layer if index == self.strategy.layer else self._on_pruned_layer
            self._handles.append(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        if self.method.needs_attention:
            self._original_attention = language_model.config._attn_implementation
            self.model.set_attn_implementation(
                {self._text_config_key(): scoring.scoring_implementation(self._original_attention)}
            )
            self._watched = self.adapter.attention_module(self.layers[self.strategy.layer - 1])
            scoring.watch(self._watched, self._on_scoring_attention)
        return self

    def detach(self) -> None:
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._watched is not None:
            scoring.unwatch(self._watched)
            self._watched = None
        if self._original_attention is not None:
            self.model.set_attn_implementation({self._text_config_key(): self._original_attention})
            self._original_attention = None
        self._prefill = self._sequence = self._pruned_inputs = None

    def __enter__(self) -> Pruner:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def set_image_sizes(self, sizes: list[list[tuple[int, int]]] | None) -> None:
        """Original (height, width) of every image, per sample, for the next prefill's padding suppression."""
        self._image_sizes = sizes

    # ------------------------------------------------------------------ checks

    def _text_config_key(self) -> str:
        config, text_config = self.model.config, self.adapter.language_model().config
        for key in getattr(config, "sub_configs", {}):
            if getattr(config, key, None) is text_config:
                return key
        return ""

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

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._prefill, self._pruned_inputs, self._decoding = None, None, False
        input_ids, self._pending_input_ids = self._pending_input_ids, None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("the pruner needs the VLM to call its language model with inputs_embeds")
        cache = kwargs.get("past_key_values")
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
            if input_ids is not None and self._has_image_tokens(input_ids):
                raise NotImplementedError(
                    "image tokens after the prefill (multi-turn with a cache) are not supported"
                )
            self._decoding = True
            return

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
        self._prefill = _Prefill(input_ids, padding_mask, self.adapter.visual_layout(input_ids))
        self._sequence = None

    def _after_language_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._prefill, self._pruned_inputs, self._decoding = None, None, False

    def _on_scoring_attention(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> None:
        if self._prefill is not None:
            self._prefill.last_token_attention = scoring.last_query_attention(
                query, key, attention_mask, scaling
            )

    def _on_pruning_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._prefill is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = self._prune_prompt(hidden, kwargs)
            args, kwargs = (
                ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
            )
        elif self._decoding:
            self._pruned_inputs = self._decoding_inputs(args[0] if args else kwargs["hidden_states"], kwargs)
        return self._on_pruned_layer(module, args, kwargs) or (args, kwargs)

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
        return bool(self.adapter.visual_layout(input_ids).valid.any())

    def _select(self, prefill: _Prefill) -> tuple[torch.Tensor, torch.Tensor]:
        """Which visual tokens to keep: (B, N) bool, and the (B, N) weighted scores that were ranked."""
        layout = prefill.layout
        strategy = self.strategy
        if self.method.needs_attention and prefill.last_token_attention is None:
            raise RuntimeError(
                f"layer {strategy.layer - 1} did not report its attention; is the model's forward hooked?"
            )
        scores = self.method.score(
            ScoringInputs(layout, prefill.input_ids, prefill.padding_mask, prefill.last_token_attention)
        )
        weights = strategy.prior.weights(layout.row, layout.col, layout.grid_h, layout.grid_w).to(
            scores.device
        )
        if strategy.prior.suppress_padding:
            weights = weights * self._padding_weights(layout).to(weights.device)
        weighted = scores * weights  # (B, N)

        candidates = layout.valid & layout.prunable  # (B, N)
        kept = layout.valid & ~layout.prunable  # never-prunable tokens stay
        n_slots = weighted.shape[1]
        slot = torch.arange(n_slots, device=weighted.device)
        images = int(layout.images_per_sample.max()) if weighted.numel() else 0
        for image in range(images):
            in_image = candidates & (layout.image_index == image)  # (B, N)
            count = in_image.sum(dim=1)  # (B,)
            largest = int(count.max())
            if largest == 0:
                continue
            budget = torch.tensor(
                [strategy.budget(int(c)) if int(c) > 0 else 0 for c in count.tolist()], device=weighted.device
            )
            if bool((budget > count).any()):
                raise ValueError(
                    f"strategy.keep={strategy.keep} is larger than the {largest} prunable image tokens "
                    f"of an image; "
                    f"use keep <= {largest}, or strategy.ratio for a share of each image"
                )
            ranked = torch.where(in_image, weighted, torch.full_like(weighted, float("-inf")))
            # A stable descending sort breaks ties towards the earlier token, so the choice is reproducible.
            order = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # (B, N)
            rank = torch.empty_like(order).scatter_(1, order, slot.expand_as(order))
            kept |= in_image & (rank < budget[:, None])
        return kept, weighted

    def _padding_weights(self, layout: VisualLayout) -> torch.Tensor:
        """(B, N) 0 for tokens that lie mostly in the pad-to-square border, 1 elsewhere."""
        sizes, self._image_sizes = self._image_sizes, None
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

    def _prune_prompt(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Drop the unselected image tokens from layer K's inputs; returns the kept hidden states."""
        prefill = self._prefill
        layout = prefill.layout
        batch, length = prefill.input_ids.shape
        kept_visual, weighted = self._select(prefill)

        # (B, L) which sequence positions survive: every non-visual token, and the kept visual ones.
        dropped = layout.valid & ~kept_visual
        keep = torch.ones(batch, length + 1, dtype=torch.bool, device=hidden.device)
        keep.scatter_(1, torch.where(dropped, layout.seq_index, length), False)
        keep = keep[:, :length]
        pruned_length = int(keep.sum(dim=1).max())
        # Kept positions in order, right-aligned; samples that keep fewer tokens are left-filled with dropped
        # positions that are masked out like left padding (only when images per sample differ).
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, length - pruned_length :]  # (B, L')
        slot_is_kept = keep.gather(1, order)  # (B, L')
        pruned_padding = prefill.padding_mask.gather(1, order) & slot_is_kept  # (B, L')

        pruned_hidden = _gather_sequence(hidden, order, seq_dim=1)  # (B, L', D)
        cos, sin = kwargs["position_embeddings"]
        position_embeddings = (
            _gather_sequence(cos, order, seq_dim=cos.dim() - 2),
            _gather_sequence(sin, order, seq_dim=sin.dim() - 2),
        )
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and not self._uses_flash_attention():
            position_ids = _gather_sequence(position_ids, order, seq_dim=position_ids.dim() - 1)
        else:
            # FlashAttention reads non-contiguous position ids as packed sequences; the mask says it all.
            position_ids = None
        cache = kwargs.get("past_key_values")
        self._pruned_inputs = _PrunedLayerInputs(
            self._pruned_mask(pruned_hidden, pruned_padding, cache), position_embeddings, position_ids
        )
        self._sequence = _Sequence(length, pruned_padding, cache)
        self._record(prefill, kept_visual, weighted)
        return pruned_hidden

    def _decoding_inputs(self, hidden: torch.Tensor, kwargs: dict) -> _PrunedLayerInputs:
        """Mask for the pruned layers at a decoding step: pruned prompt mask + the new tokens' mask."""
        sequence = self._sequence
        cache = kwargs.get("past_key_values")
        full_mask = self._language_model_padding_mask
        if full_mask is None:
            # Layer K has not cached this step's tokens yet: it will hold its past plus the new queries.
            kv_length = cache.get_seq_length(self.strategy.layer) + hidden.shape[1]
            new_tokens = kv_length - sequence.pruned_padding_mask.shape[1]
            new_mask = torch.ones(hidden.shape[0], new_tokens, dtype=torch.bool, device=hidden.device)
        else:
            new_mask = full_mask[:, sequence.prompt_length :].bool()
        padding = torch.cat([sequence.pruned_padding_mask, new_mask], dim=1)
        return _PrunedLayerInputs(self._pruned_mask(hidden, padding, cache), None, kwargs.get("position_ids"))

    def _pruned_mask(self, hidden: torch.Tensor, padding: torch.Tensor, cache: Cache | None) -> Any:
        """The causal + padding mask of the pruned layers, in the format of the model's attention backend."""
        return create_causal_mask(
            config=self.adapter.language_model().config,
            inputs_embeds=hidden,
            attention_mask=padding,
            past_key_values=cache,
            position_ids=None,
            layer_idx=self.strategy.layer,
        )

    def _uses_flash_attention(self) -> bool:
        return "flash" in (self.adapter.language_model().config._attn_implementation or "")

    def _record(self, prefill: _Prefill, kept_visual: torch.Tensor, weighted: torch.Tensor) -> None:
        layout = prefill.layout
        layers, k = len(self.layers), self.strategy.layer
        visual_before = layout.valid.sum(dim=1)  # (B,)
        visual_after = (layout.valid & kept_visual).sum(dim=1)
        real_before = prefill.padding_mask.sum(dim=1)
        real_after = real_before - (visual_before - visual_after)
        below = torch.arange(layers, device=visual_before.device)[:, None] < k  # (layers, 1)
        self.last_record = PruningRecord(
            layer=k,
            layout=layout,
            kept=kept_visual,
            scores=weighted,
            visual_tokens=torch.where(below, visual_before, visual_after),
            sequence_lengths=torch.where(below, real_before, real_after),
        )
