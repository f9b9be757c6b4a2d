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
            scaling = kwargs.get("scaling")
            if scaling is None:  # the backends' default: 1 / sqrt(head_dim)
                scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
            callback(query, key, attention_mask, scaling)
        return _base_function(module, base)(module, query, key, value, attention_mask, **kwargs)

    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_implementation(name: str) -> str:
    return name.removeprefix(PREFIX)


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
