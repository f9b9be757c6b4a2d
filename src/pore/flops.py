"""Estimated prefill FLOPs of a decoder-only language model, from the tokens each layer processes.

Counts multiply-adds as 2 FLOPs in the dense projections, the attention products (QK^T and AV over the
causal half of the score matrix) and the gated MLP; norms, RoPE and softmax are negligible and left out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pore import compat


def decoder_layer_flops(config, tokens: int) -> float:
    """FLOPs of one decoder layer of a LLaMA-style model over a prompt of `tokens` tokens; `config` is the
    layer's own (`compat.layer_config`: Gemma 4's layers differ in head size and key / value heads). A layer
    with a mixture-of-experts block besides its MLP (Gemma 4 26B-A4B) also counts its `top_k_experts`
    experts per token."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    n = float(tokens)
    projections = 2 * n * hidden * (heads + 2 * kv_heads) * head_dim + 2 * n * heads * head_dim * hidden
    attention = 2 * 2 * heads * head_dim * n * (n + 1) / 2  # causal: query i reads i + 1 keys
    mlp = 2 * 3 * n * hidden * config.intermediate_size
    if getattr(config, "enable_moe_block", False):
        mlp += 2 * 3 * n * hidden * config.moe_intermediate_size * config.top_k_experts
    return projections + attention + mlp


def prefill_flops(config, tokens_per_layer: Iterable[int]) -> float:
    """FLOPs of the decoder layers, given how many tokens each layer processes (layer i: its own config)."""
    return sum(
        decoder_layer_flops(compat.layer_config(config, index), int(tokens))
        for index, tokens in enumerate(tokens_per_layer)
    )


def record_prefill_flops(config, sequence_lengths: torch.Tensor) -> torch.Tensor:
    """(B,) FLOPs per sample from a `PruningRecord.sequence_lengths` (num_layers, B) tensor."""
    return torch.tensor(
        [prefill_flops(config, sequence_lengths[:, b].tolist()) for b in range(sequence_lengths.shape[1])],
        dtype=torch.float64,
    )
