"""Shorten the sequence before decoder layer K by a given index: the ideal, and the base of eager FastV.

`SequenceReducer` drops positions exactly where the engine does (a forward pre-hook on decoder layer K) and
hands layers K.. the same things the engine hands them: the kept hidden states, the kept tokens' RoPE
embeddings and position ids (kept tokens keep their original positions), and a causal mask for the shorter
sequence built by transformers' `create_causal_mask` in the attention backend's format, each of the layer's
kind (Gemma 3: sliding-window layers get the window and the local RoPE; the tokens of one image keep
attending to each other both ways). At decoding steps the pruned layers get the mask of their shorter cache
plus the new tokens. Which positions survive is the subclass's `select`.

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
        self.config = self.adapter.language_model().config
        self._layer_index = {module: index for index, module in enumerate(self.layers)}
        self._handles: list[Any] = []
        self._prefill = False
        self._call: dict[str, Any] = {}  # the multimodal forward's 2-D padding mask and image blocks
        self._padding: torch.Tensor | None = None  # (B, L) the language model's 2-D mask of this forward
        self._pruned_padding: torch.Tensor | None = None  # (B, L') kept slots of the prompt
        self._index: torch.Tensor | None = None  # (B, L') the kept positions of this prompt
        self._block_ids: torch.Tensor | None = None  # (B, L') the kept tokens' image blocks (Gemma 3)
        self._mask_padding: torch.Tensor | None = None  # (B, KV) real keys of the pruned layers, this forward
        self._prompt_length = 0
        self._shared: dict[str, Any] = {}  # what every layer from K on gets (position ids) this forward
        self._per_kind: dict[str, dict[str, Any]] = {}  # mask (and RoPE) per layer kind, this forward

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
            self.adapter.multimodal_module().register_forward_pre_hook(self._on_multimodal, with_kwargs=True),
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
        self._pruned_padding = self._padding = self._index = self._block_ids = self._mask_padding = None
        self._shared, self._per_kind, self._call = {}, {}, {}

    def __enter__(self) -> SequenceReducer:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ hooks

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The 2-D padding mask the model was called with (Gemma 3 hands its language model masks already
        built per layer kind) and, at a prompt, its image blocks (tokens of one image attend both ways)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        blocks = None
        if input_ids is not None:
            blocks = self.adapter.bidirectional_blocks(input_ids, kwargs)
        self._call = {"attention_mask": kwargs.get("attention_mask"), "block_ids": blocks}

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = compat.cache_from(kwargs)
        # A prompt when nothing is cached yet (get_seq_length is a shape read, no device sync).
        self._prefill = cache is None or cache.get_seq_length() == 0
        padding = kwargs.get("attention_mask")
        self._padding = self._call.get("attention_mask") if isinstance(padding, dict) else padding
        self._shared, self._per_kind, self._mask_padding = {}, {}, None

    def _after_language_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._shared, self._per_kind, self._mask_padding, self._padding = {}, {}, None, None

    def _on_first_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = compat.cache_from(kwargs)
        if self._prefill:
            index = self._index = self.select(hidden, kwargs)
            batch, length = hidden.shape[:2]
            hidden = gather_sequence(hidden, index, seq_dim=1)
            padding = self._padding
            if padding is None:
                padding = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
            self._pruned_padding = self._mask_padding = gather_sequence(padding.bool(), index, seq_dim=1)
            blocks = self._call.get("block_ids")
            self._block_ids = None if blocks is None else gather_sequence(blocks.to(index.device), index, 1)
            self._prompt_length = length
            if "position_ids" in kwargs:
                self._shared["position_ids"] = self._kept_position_ids(kwargs.get("position_ids"), index)
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
            self._mask_padding = torch.cat([self._pruned_padding, new], dim=1)
        return self._on_later_layer(module, args, kwargs) or (args, kwargs)

    def _on_later_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Every layer from K on gets the mask of its kind (full / sliding window) and, at a prompt, the kept
        tokens' RoPE of its kind (Gemma 3's local and global bases), each built once per forward."""
        if self._mask_padding is None:
            return None
        index = self._layer_index[module]
        kind = compat.layer_type(self.config, index)
        if kind not in self._per_kind:
            hidden = args[0] if args else kwargs["hidden_states"]
            blocks = self._block_ids if self._prefill else None
            own = {
                "attention_mask": self._mask(
                    hidden, self._mask_padding, compat.cache_from(kwargs), index, blocks
                )
            }
            if self._prefill:
                cos, sin = kwargs["position_embeddings"]  # the layer's own kind, for the whole prompt
                own["position_embeddings"] = (
                    gather_sequence(cos, self._index, seq_dim=cos.dim() - 2),
                    gather_sequence(sin, self._index, seq_dim=sin.dim() - 2),
                )
            self._per_kind[kind] = own
        return args, {**kwargs, **self._shared, **self._per_kind[kind]}

    def _kept_position_ids(
        self, position_ids: torch.Tensor | None, index: torch.Tensor
    ) -> torch.Tensor | None:
        # FlashAttention reads non-contiguous position ids as packed sequences; the mask says it all.
        flash = "flash" in str(self.config._attn_implementation)
        if position_ids is None or flash:
            return None
        return gather_sequence(position_ids, index, seq_dim=position_ids.dim() - 1)

    def _mask(
        self,
        hidden: torch.Tensor,
        padding: torch.Tensor,
        cache: Cache | None,
        layer: int | None = None,
        block_ids: torch.Tensor | None = None,
    ) -> Any:
        layer = self.layer if layer is None else layer
        return compat.causal_mask(self.config, hidden, padding, cache, layer, block_ids)


class IdealReducer(SequenceReducer):
    """Keep a fixed (B, L') index chosen before the run: pruning at layer K with scoring made free."""

    def __init__(self, model: nn.Module, layer: int, index: torch.Tensor) -> None:
        super().__init__(model, layer)
        self.index = index

    def select(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.index.shape[0] != hidden.shape[0]:
            raise ValueError(f"the ideal's index is for batch {self.index.shape[0]}, got {hidden.shape[0]}")
        return self.index
