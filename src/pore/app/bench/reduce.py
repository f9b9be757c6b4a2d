"""Shorten the sequence before decoder layer K by a given index: the ideal, and the base of eager FastV.

`SequenceReducer` drops positions exactly where the engine does (a forward pre-hook on decoder layer K) and
hands layers K.. the same things the engine hands them: the kept hidden states, the kept tokens' RoPE
embeddings and position ids (kept tokens keep their original positions), and a causal mask for the shorter
sequence built by transformers' `create_causal_mask` in the attention backend's format. At decoding steps
the pruned layers get the mask of their shorter cache plus the new tokens. Which positions survive is the
subclass's `select`.

`IdealReducer` keeps a fixed, precomputed index: no scoring, no top-k, no data-dependent bookkeeping, no
host synchronisation. Layers below K run on the full sequence and layers from K on the kept one, exactly as
in a pruned run, so its time is what pruning at layer K costs with scoring made free: the best a pruning
method with this layer split can achieve. The one gather per tensor it still does is the data movement any
layer-K pruning needs (a few tens of MB at batch 32, microseconds on a GPU), so it is part of the ideal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from pore import adapter_for, compat
from pore.engine import gather_sequence


class SequenceReducer:
    """Keep `select(...)` (B, L') positions from decoder layer `layer` on; attach()/detach() or `with`."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.layers = self.adapter.decoder_layers()
        if not 0 < layer < len(self.layers):
            raise ValueError(f"layer must be in 1..{len(self.layers) - 1}, got {layer}")
        self.layer = layer
        self._handles: list[Any] = []
        self._prefill = False
        self._padding: torch.Tensor | None = None  # (B, L) the language model's 2-D mask of this forward
        self._pruned_padding: torch.Tensor | None = None  # (B, L') kept slots of the prompt
        self._prompt_length = 0
        self._layer_kwargs: dict[str, Any] | None = None  # what layers K.. get instead of their own

    # ------------------------------------------------------------------ subclass interface

    def select(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """(B, L') sorted positions of the prompt that layers K.. see."""
        raise NotImplementedError

    def extra_hooks(self) -> list[Any]:
        """Further hook handles a subclass needs (removed on detach)."""
        return []

    # ------------------------------------------------------------------ lifecycle

    def attach(self) -> SequenceReducer:
        if self._handles:
            return self
        language_model = self.adapter.language_model()
        self._handles = [
            language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
            language_model.register_forward_hook(self._after_language_model, always_call=True),
        ]
        for index in range(self.layer, len(self.layers)):
            hook = self._on_first_layer if index == self.layer else self._on_later_layer
            self._handles.append(self.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        self._handles += self.extra_hooks()
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._layer_kwargs = self._pruned_padding = self._padding = None

    def __enter__(self) -> SequenceReducer:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ hooks

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = compat.cache_from(kwargs)
        # A prompt when nothing is cached yet (get_seq_length is a shape read, no device sync).
        self._prefill = cache is None or cache.get_seq_length() == 0
        self._padding = kwargs.get("attention_mask")
        self._layer_kwargs = None

    def _after_language_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._layer_kwargs, self._padding = None, None

    def _on_first_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = compat.cache_from(kwargs)
        if self._prefill:
            index = self.select(hidden, kwargs)
            batch, length = hidden.shape[:2]
            hidden = gather_sequence(hidden, index, seq_dim=1)
            cos, sin = kwargs["position_embeddings"]
            padding = self._padding
            if padding is None:
                padding = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
            self._pruned_padding = gather_sequence(padding.bool(), index, seq_dim=1)
            self._prompt_length = length
            layer_kwargs: dict[str, Any] = {
                "position_embeddings": (
                    gather_sequence(cos, index, seq_dim=cos.dim() - 2),
                    gather_sequence(sin, index, seq_dim=sin.dim() - 2),
                ),
                "attention_mask": self._mask(hidden, self._pruned_padding, cache),
            }
            position_ids = kwargs.get("position_ids")
            if "position_ids" in kwargs:
                # FlashAttention reads non-contiguous position ids as packed sequences; the mask says it all.
                flash = "flash" in str(self.adapter.language_model().config._attn_implementation)
                layer_kwargs["position_ids"] = (
                    None
                    if position_ids is None or flash
                    else gather_sequence(position_ids, index, seq_dim=position_ids.dim() - 1)
                )
            self._layer_kwargs = layer_kwargs
            args, kwargs = (
                ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
            )
        elif self._pruned_padding is not None:
            # Decoding: the pruned layers hold L' + past-new tokens; the new ones come after them.
            if self._padding is not None:
                new = self._padding[:, self._prompt_length :].bool()
            else:
                new_length = (
                    cache.get_seq_length(self.layer) + hidden.shape[1] - self._pruned_padding.shape[1]
                )
                new = torch.ones(hidden.shape[0], new_length, dtype=torch.bool, device=hidden.device)
            padding = torch.cat([self._pruned_padding, new], dim=1)
            self._layer_kwargs = {"attention_mask": self._mask(hidden, padding, cache)}
        return self._on_later_layer(module, args, kwargs) or (args, kwargs)

    def _on_later_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._layer_kwargs is None:
            return None
        return args, {**kwargs, **self._layer_kwargs}

    def _mask(self, hidden: torch.Tensor, padding: torch.Tensor, cache: Cache | None) -> Any:
        return compat.causal_mask(self.adapter.language_model().config, hidden, padding, cache, self.layer)


class IdealReducer(SequenceReducer):
    """Keep a fixed (B, L') index chosen before the run: pruning at layer K with scoring made free."""

    def __init__(self, model: nn.Module, layer: int, index: torch.Tensor) -> None:
        super().__init__(model, layer)
        self.index = index

    def select(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.index.shape[0] != hidden.shape[0]:
            raise ValueError(f"the ideal's index is for batch {self.index.shape[0]}, got {hidden.shape[0]}")
        return self.index
