"""Tiny random LLaVA models built from configs (real transformers classes, nothing downloaded).

Also the test session's environment: nothing is fetched from a hub (set before any test module imports
`datasets` or `huggingface_hub`), W&B logs offline, and each test process computes with one thread.
"""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

# One thread per test process, as the subprocess runs have (OMP_NUM_THREADS=1): the workers of pytest-xdist
# and the programs the tests launch share a few cores, and spinning OpenMP threads slow each other down.
torch.set_num_threads(1)

IMAGE_TOKEN = 100
PAD_TOKEN = 0
GRID = 6  # 48 px images, 8 px patches: a 6 x 6 grid of 36 image tokens
TOKENS_PER_IMAGE = GRID * GRID


def build_tiny_llava(
    attn_implementation: str = "sdpa", layers: int = 4, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model small enough for CPU tests.

    The weights are random but drawn with a large std, so that attention is peaked and top-k choices are
    well separated (with the default 0.02 every image token gets nearly the same attention).
    """
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=GRID * 8,
        patch_size=8,
        projection_dim=32,
        initializer_range=0.2,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN,
        initializer_range=0.2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=TOKENS_PER_IMAGE,
        initializer_range=0.2,
    )
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


@pytest.fixture
def tiny_llava() -> Callable[..., LlavaForConditionalGeneration]:
    return build_tiny_llava


def make_prompt(prefix: list[int], images: int, suffix: list[int]) -> list[int]:
    return prefix + [IMAGE_TOKEN] * (TOKENS_PER_IMAGE * images) + suffix


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, L) for prompts padded on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, length - len(prompt) :] = torch.tensor(prompt)
        mask[b, length - len(prompt) :] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions as generate() computes them: counting real tokens only."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pixels(images: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(images, 3, GRID * 8, GRID * 8, generator=generator)
