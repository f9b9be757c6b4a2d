"""The attention tap: see the query and key states of chosen attention calls while SDPA / FlashAttention run.

transformers looks attention functions up by the name in `config._attn_implementation`. We register
`pore_<base>` (e.g. `pore_sdpa`) as a thin wrapper that, for the attention modules someone watches, hands
the query and key states it receives (post-RoPE, grouped heads), the mask and the scaling to the watchers'
callbacks, then calls the base implementation unchanged. The full (L x L) attention matrix is never
materialised, and the mask function of `pore_<base>` is the base's own, so masks keep their backend's
format.

One `Tap` serves one user (the Pruner, the Calibrator): it switches the sub-models it needs to the wrapper,
watches modules with callbacks (several callbacks may watch one module: a method that asks for a layer's
attention rows and its keys gets two), and `release()` undoes all of it. `query_attention` turns the states a
callback receives into rows of attention.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "pore_"

# Called as callback(query, key, attention_mask, scaling) for every call of a watched attention module:
# query (B, H, L_q, d), key (B, H_kv, L_k, d) post-RoPE, the mask in the backend's format, the softmax scale.
AttentionCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], None]
_WATCHERS: WeakKeyDictionary[nn.Module, list[AttentionCallback]] = WeakKeyDictionary()


def _base_function(module: nn.Module, base: str) -> Callable:
    if base == "eager":
        # Each modelling file has its own eager function (it is not in the global registry).
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def scoring_implementation(base: str) -> str:
    """Register (once) and return the name of the tap's wrapper around attention implementation `base`."""
    if base.startswith(PREFIX):
        return base
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"unknown attention implementation {base!r}")
    name = PREFIX + base

    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        callbacks = _WATCHERS.get(module)
        if callbacks:
            scaling = kwargs.get("scaling")
            if scaling is None:  # the backends' default: 1 / sqrt(head_dim)
                scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            for callback in tuple(callbacks):
                callback(query, key, attention_mask, scaling)
        return _base_function(module, base)(module, query, key, value, attention_mask, **kwargs)

    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_implementation(name: str) -> str:
    return name.removeprefix(PREFIX)


def config_key(model: nn.Module, sub_config: Any) -> str:
    """The key of `sub_config` in `model.config` as `set_attn_implementation` takes it ("" = top level)."""
    config = model.config
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is sub_config:
            return key
    return ""


class Tap:
    """Switch sub-models of `model` to the wrapper and watch attention modules; `release()` undoes both."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._original: dict[str, str] = {}  # config key -> the implementation to restore
        self._watching: list[tuple[nn.Module, AttentionCallback]] = []

    def switch(self, sub_config: Any) -> None:
        """Run the sub-model of `sub_config` through the wrapper (once; its base is restored on release)."""
        key = config_key(self.model, sub_config)
        if key in self._original:
            return
        base = sub_config._attn_implementation
        if base.startswith(PREFIX):
            raise RuntimeError(
                "the model already runs the pore attention tap (is a Pruner or a Calibrator attached?); "
                "detach it first"
            )
        self.model.set_attn_implementation({key: scoring_implementation(base)})
        self._original[key] = base

    def watch(self, module: nn.Module, callback: AttentionCallback) -> None:
        """Call `callback` with the query / key states of every call of `module` (its sub-model switched)."""
        _WATCHERS.setdefault(module, []).append(callback)
        self._watching.append((module, callback))

    def release(self) -> None:
        """Stop watching and restore every attention implementation this tap switched."""
        for module, callback in self._watching:
            callbacks = _WATCHERS.get(module, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                _WATCHERS.pop(module, None)
        self._watching = []
        if self._original:
            self.model.set_attn_implementation(dict(self._original))
            self._original = {}


def query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    positions: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention of some queries over all keys, averaged over heads: (B, Q, L_k) float32.

        query: (B, H, L_q, D); key: (B, H_kv, L_k, D) with H = H_kv * G (grouped-query attention: head h reads
        key head h // G, the layout of transformers' `repeat_kv`). positions: (B, Q) long query positions, or
        None for the last query only (Q = 1). attention_mask as the backend receives it: 4-D bool (True =
        attend, SDPA), 4-D float (additive, eager), 2-D (1 = real token, FlashAttention; the causal part is
        applied here) or None (no padding). `causal=False` for bidirectional encoders (a vision tower's [CLS]
    row). Only these Q rows are computed, never the L_q x L_k map.
    """
    batch, heads, q_length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    if positions is None:
        positions = torch.full((batch, 1), q_length - 1, dtype=torch.long, device=query.device)
    n_queries = positions.shape[1]
    picked = query.gather(2, positions[:, None, :, None].expand(batch, heads, n_queries, head_dim))
    picked = picked.reshape(batch, kv_heads, heads // kv_heads, n_queries, head_dim)  # (B, H_kv, G, Q, D)
    logits = torch.matmul(picked, key[:, :, None].transpose(-1, -2)).float() * scaling  # (B, H_kv, G, Q, L_k)
    # Queries sit at the end of the keys (a prefill with no past): query i is key position offset + i.
    key_position = torch.arange(kv_length, device=query.device)
    allowed = key_position[None, None, :] <= (positions + kv_length - q_length)[:, :, None]  # (B, Q, L_k)
    if not causal:
        allowed = torch.ones_like(allowed)
    if attention_mask is not None and attention_mask.dim() == 4:
        rows = attention_mask[:, 0, :, -kv_length:]  # (B or 1, L_q, L_k)
        rows = rows.expand(batch, -1, -1).gather(1, positions[:, :, None].expand(-1, -1, kv_length))
        if rows.dtype == torch.bool:
            allowed = allowed & rows
        else:
            logits = logits + rows[:, None, None].float()
    elif attention_mask is not None:
        allowed = allowed & attention_mask[:, None, -kv_length:].bool()
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A query that may see no key (a padding query) gets zeros instead of the softmax's NaNs.
    probs = probs.nan_to_num(0.0)
    return probs.mean(dim=(1, 2))  # (B, Q, L_k)


def last_query_attention(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of the last query over all keys, averaged over heads: (B, L_k) float32."""
    return query_attention(query, key, attention_mask, scaling)[:, 0]


def cls_attention(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """(views, L_v) float32: a bidirectional encoder's first ([CLS]) query's attention over its positions."""
    first = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
    return query_attention(query, key, attention_mask, scaling, first, causal=False)[:, 0]
