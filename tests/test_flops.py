import pytest
import torch
from transformers import LlamaConfig

from pore.flops import decoder_layer_flops, prefill_flops, record_prefill_flops


def test_layer_flops_by_hand() -> None:
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    # q, k, v: 2*n*8*(2+2)*4 = 256 n; o: 2*n*8*8 = 128 n; mlp: 6*n*8*16 = 768 n; attention: 4*8*n(n+1)/2.
    n = 3
    assert decoder_layer_flops(config, n) == 256 * n + 128 * n + 768 * n + 16 * n * (n + 1)


def test_pruning_saves_flops_in_proportion() -> None:
    config = LlamaConfig()  # LLaMA-7B shapes
    full = prefill_flops(config, [640] * 32)
    pruned = prefill_flops(config, [640] * 2 + [128] * 30)
    assert 0.15 < pruned / full < 0.3
    per_sample = record_prefill_flops(config, torch.tensor([[640, 10]] * 2 + [[128, 10]] * 30))
    assert per_sample[0].item() == pytest.approx(pruned)


def test_layers_of_a_heterogeneous_config_count_with_their_own_shapes() -> None:
    """Gemma 4's sliding layers have 8-wide heads and its global layers 16-wide ones in the tiny model (and
    reading `head_dim` off its config raises): each layer counts with its own head size."""
    from pore.testing.tiny_gemma4 import build_tiny_gemma4

    config = build_tiny_gemma4().config.get_text_config()
    hidden, n = config.hidden_size, 10

    def by_hand(head_dim: int) -> float:  # 4 query heads, 2 key / value heads, MLP 64 wide
        return (
            2 * n * hidden * (4 + 4) * head_dim
            + 2 * n * 4 * head_dim * hidden
            + 4 * 4 * head_dim * n * (n + 1) / 2
            + 6 * n * hidden * 64
        )

    expected = sum(by_hand(8 if i % 2 == 0 else 16) for i in range(config.num_hidden_layers))
    assert prefill_flops(config, [n] * config.num_hidden_layers) == pytest.approx(expected)
