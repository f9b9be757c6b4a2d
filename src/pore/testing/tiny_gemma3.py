"""A tiny Gemma 3 (`Gemma3ForConditionalGeneration`) with random weights, built offline in a second.

The real architecture at toy sizes: a SigLIP vision tower (no [CLS]), Gemma 3's projector (average pooling
of the patch grid to `mm_tokens_per_image` tokens, soft-embedding norm, projection), and a Gemma 3 language
model that interleaves sliding-window and global layers with their own RoPE bases. The default sliding window
(8 tokens) is shorter than a prompt with one image (16 image tokens), so that the window matters in the
tests.

Prompts are written with token ids (`gemma3_prompt`), as Gemma 3's processor lays them out: each image is
`<start_of_image>`, `mm_tokens_per_image` image tokens, `<end_of_image>`; `token_type_ids` mark the image
tokens (1), which the model reads to let the tokens of one image attend to each other both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GenerationConfig,
    SiglipVisionConfig,
)

__all__ = [
    "BOI_TOKEN",
    "EOI_TOKEN",
    "IMAGE_TOKEN",
    "build_tiny_gemma3",
    "gemma3_prompt",
    "tiny_gemma3_config",
]

PAD_TOKEN, EOS_TOKEN, BOS_TOKEN = 0, 1, 2  # Gemma's own order of the first special ids
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = 5, 6, 7  # <image_soft_token>, <start_of_image>, <end_of_image>
FIRST_WORD = 8  # text tokens are ids FIRST_WORD..vocab_size-1


def tiny_gemma3_config(
    vocab_size: int = 64,
    hidden_size: int = 32,
    text_layers: int = 4,
    sliding_window: int = 8,
    layer_types: Sequence[str] | None = None,
    image_size: int = 32,
    patch_size: int = 4,
    tokens_per_image: int = 16,
) -> Gemma3Config:
    """A `Gemma3Config` at toy sizes; `layer_types` default: sliding, full, sliding, full, ..."""
    if layer_types is None:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)]
    text = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN,
        eos_token_id=EOS_TOKEN,
        bos_token_id=BOS_TOKEN,
    )
    vision = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=tokens_per_image,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI_TOKEN,
        eoi_token_index=EOI_TOKEN,
    )


def build_tiny_gemma3(
    seed: int = 0, attn_implementation: str = "sdpa", **config: Any
) -> Gemma3ForConditionalGeneration:
    """A randomly initialised tiny model (eval mode) whose weights depend only on `seed` and the config;
    the global RNG state is left untouched. `config` goes to `tiny_gemma3_config`."""
    settings = tiny_gemma3_config(**config)
    settings._attn_implementation = attn_implementation
    settings.text_config._attn_implementation = attn_implementation
    settings.vision_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(settings).eval()
        # Gemma initialises the projection (and the RMSNorm gains) to zeros: every image token would be the
        # same. Random values give each token its own features (and attention scores without ties).
        projector = model.model.multi_modal_projector
        with torch.no_grad():
            projector.mm_input_projection_weight.normal_(std=hidden_std(settings))
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.normal_(std=0.1)
    model.generation_config = GenerationConfig(
        eos_token_id=EOS_TOKEN, pad_token_id=PAD_TOKEN, max_new_tokens=16, do_sample=False
    )
    return model


def hidden_std(config: Gemma3Config) -> float:
    return config.text_config.hidden_size**-0.5


def gemma3_prompt(
    prefix: Sequence[int], images: int, suffix: Sequence[int], tokens_per_image: int = 16
) -> list[int]:
    """Token ids of a prompt: <bos>, `prefix`, each image as <start_of_image> image tokens <end_of_image>,
    then `suffix` (word ids, >= FIRST_WORD)."""
    ids = [BOS_TOKEN, *prefix]
    for _ in range(images):
        ids += [BOI_TOKEN, *([IMAGE_TOKEN] * tokens_per_image), EOI_TOKEN]
    return ids + list(suffix)
