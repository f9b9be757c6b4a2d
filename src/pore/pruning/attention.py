"""Scoring attention: see the last query's attention in one layer while SDPA / FlashAttention run as usual.

transformers looks attention functions up by the name in `config._attn_implementation`. We register
`pore_<base>` (e.g. `pore_sdpa`) as a thin wrapper that, for the one attention module a pruner watches,
computes the last query's attention row from the query and key states it is handed (post-RoPE, grouped
heads), then calls the base implementation unchanged. The full (L x L) attention matrix is never
materialised, and the mask function of `pore_<base>` is the base's own, so masks keep their backend's
format.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "pore_"

# Called as callback(query, key, attention_mask, scaling) for the attention modules a pruner watches.
ScoreCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], None]
_WATCHED: WeakKeyDictionary[nn.Module, ScoreCallback] = WeakKeyDictionary()


def watch(module: nn.Module, callback: ScoreCallback) -> None:
    _WATCHED[module] = callback


def unwatch(module: nn.Module) -> None:
    _WATCHED.pop(module, None)


def _base_function(module: nn.Module, base: str) -> Callable:
    if base == "eager":
        # Each modelling file has its own eager function (it is not in the global registry).
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def scoring_implementation(base: str) -> str:
    """Register (once) and return the name of the scoring wrapper around attention implementation `base`."""
    if base.startswith(PREFIX):
        return base
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"unknown attention implementation {base!r}")
    name = PREFIX + base

    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        callback = _WATCHED.get(module)
        if callback is not None:
            callback(query, key, attention_mask, kwargs.get("scaling", module.scaling))
        return _base_function(module, base)(module, query, key, value, attention_mask, **kwargs)

    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_implementation(name: str) -> str:
    return name.removeprefix(PREFIX)


def last_query_attention(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of the last query over all keys, averaged over heads: (B, L_k) float32.

    query: (B, H, L_q, D); key: (B, H_kv, L_k, D) with H = H_kv * G (grouped-query attention: head h reads
    key head h // G, the layout of transformers' `repeat_kv`). attention_mask as the backend receives it:
    4-D bool (True = attend, SDPA), 4-D float (additive, eager), 2-D (1 = real token, FlashAttention) or None
    (no padding: the last query may attend to every key).
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    q_last = query[:, :, -1, :].reshape(batch, kv_heads, heads // kv_heads, head_dim)  # (B, H_kv, G, D)
    logits = torch.matmul(q_last, key.transpose(-1, -2)).float() * scaling  # (B, H_kv, G, L_k)
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            row = attention_mask[:, :, -1:, -kv_length:]  # (B, 1, 1, L_k)
        else:
            row = attention_mask[:, None, None, -kv_length:].bool()  # (B, 1, 1, L_k)
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=(1, 2))  # (B, L_k)
