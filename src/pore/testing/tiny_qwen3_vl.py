"""Tiny Qwen3-VL models (dense and MoE) with their own tokenizer and processor, built offline.

The real transformers classes (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`) with
configs small enough for a CPU: the Qwen3-VL vision tower (patch embedding, learned position grid resampled
to each image, rotary ViT blocks, 2 x 2 patch merger) with DeepStack mergers after vision blocks 0, 1 and 2,
whose features the language model adds to the image tokens' hidden states after its decoder layers 0, 1 and
2; the Qwen3 decoder with interleaved 3-D M-RoPE (dense MLPs, or sparse experts for the MoE class).

Pieces, each usable on its own:

- `build_qwen3_vl_processor`: `Qwen3VLProcessor` over the word-level Qwen tokenizer of
  `pore.testing.tiny_qwen` (Qwen's special tokens), Qwen3-VL's chat template (no default system turn) and
  Qwen2-VL's image preprocessing scaled down (patch 8, merge 2: one language-model token per 16 x 16 pixels,
  a 64 x 48 image gives a 4 x 3 grid);
- `tiny_qwen3_vl_config` / `build_tiny_qwen3_vl`: a `Qwen3VLConfig` (or `Qwen3VLMoeConfig`) and its randomly
  initialised model;
- `build_tiny_qwen3_vl_checkpoint`: model + processor saved to a folder that loads with `from_pretrained`.

transformers 5.x builds `Qwen3VLProcessor` only with its video processor, which needs torchvision. Without
torchvision, `build_qwen3_vl_processor` returns an image-only subclass of the real processor (same prompts,
same outputs for images; it cannot be loaded back with `AutoProcessor`), and `build_tiny_qwen3_vl_checkpoint`
refuses, as `pore.testing.tiny_qwen` does.

Command line: ``python -m pore.testing.tiny_qwen3_vl OUT_DIR [--moe]`` (needs torchvision).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from pore.testing.tiny_llava import DEFAULT_WORDS, save_checkpoint
from pore.testing.tiny_qwen import QWEN_SPECIAL_TOKENS, _ImagesOnly, build_qwen_tokenizer, has_video_processor

__all__ = [
    "PATCH_SIZE",
    "PIXELS_PER_TOKEN",
    "QWEN3_VL_CHAT_TEMPLATE",
    "ImageOnlyQwen3VLProcessor",
    "build_qwen3_vl_processor",
    "build_qwen3_vl_tokenizer",
    "build_tiny_qwen3_vl",
    "build_tiny_qwen3_vl_checkpoint",
    "tiny_qwen3_vl_config",
]

PATCH_SIZE = 8  # vision patches of 8 x 8 pixels (the real models: 16)
MERGE_SIZE = 2  # 2 x 2 patches per language-model token, as the real models
PIXELS_PER_TOKEN = PATCH_SIZE * MERGE_SIZE

# Qwen3-VL's chat format as in its hub chat template: no default system turn, each message as
# <|im_start|>role\n...<|im_end|>\n, each image as <|vision_start|><|image_pad|><|vision_end|> at its place
# among the content parts (the processor expands <|image_pad|> to one token per merged patch).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Config fields that hold special token ids (the tokenizer's ids, QWEN_SPECIAL_TOKENS order).
_TOKEN_IDS = {
    "image_token_id": QWEN_SPECIAL_TOKENS.index("<|image_pad|>"),
    "video_token_id": QWEN_SPECIAL_TOKENS.index("<|video_pad|>"),
    "vision_start_token_id": QWEN_SPECIAL_TOKENS.index("<|vision_start|>"),
    "vision_end_token_id": QWEN_SPECIAL_TOKENS.index("<|vision_end|>"),
}


class ImageOnlyQwen3VLProcessor(_ImagesOnly, Qwen3VLProcessor):
    """`Qwen3VLProcessor` for images only (no torchvision needed)."""


def build_qwen3_vl_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """`pore.testing.tiny_qwen`'s word-level tokenizer (Qwen's special tokens) with Qwen3-VL's template."""
    tokenizer = build_qwen_tokenizer(words)
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tokenizer


def build_qwen3_vl_processor(
    words: Iterable[str] = DEFAULT_WORDS,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
    images_only: bool | None = None,
) -> Qwen3VLProcessor:
    """`Qwen3VLProcessor`: one language-model token per 16 x 16 pixels, images resized (aspect ratio kept)
    to multiples of 16 pixels with an area in [min_pixels, max_pixels] (at most 8 x 8 tokens).

    The image processor is the PIL backend (the default one needs torchvision); the saved folder records
    `Qwen2VLImageProcessor`, so `AutoProcessor` picks whichever backend the loading machine has.
    `images_only=None` builds the real class (with Qwen3-VL's video processor) when torchvision is installed
    and the image-only subclass otherwise; True / False force one or the other.
    """
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    parts = dict(
        image_processor=image_processor,
        tokenizer=build_qwen3_vl_tokenizer(words),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    if not has_video_processor() if images_only is None else images_only:
        return ImageOnlyQwen3VLProcessor(**parts)
    if not has_video_processor():
        raise ImportError(
            "Qwen3-VL's video processor needs torchvision: pip install torchvision (or images_only=True)"
        )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video = Qwen3VLVideoProcessor(patch_size=PATCH_SIZE, temporal_patch_size=2, merge_size=MERGE_SIZE)
    return Qwen3VLProcessor(video_processor=video, **parts)


def tiny_qwen3_vl_config(
    vocab_size: int,
    moe: bool = False,
    text_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    deepstack_layers: Sequence[int] = (0, 1, 2),
    *,
    pad_token_id: int = 0,
    eos_token_id: int = 2,
    initializer_range: float = 0.2,
) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """A small Qwen3-VL config: the real vision tower with DeepStack mergers after `deepstack_layers` (their
    features go to the image tokens after decoder layers 0, 1, ... in that order) and the real Qwen3 decoder
    with interleaved M-RoPE; `moe=True` gives Qwen3-VL-MoE's decoder (4 experts, 2 per token, every layer
    sparse). `initializer_range` is 0.2 (not 0.02) so that a random model's attention is peaked and pruning
    choices are well separated.
    """
    head_dim = hidden // heads
    half = head_dim // 2
    spatial = (half - half // 4) // 2  # height and width take the larger shares, like the real [24, 20, 20]
    text: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [half - 2 * spatial, spatial, spatial],
            "mrope_interleaved": True,
        },
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        initializer_range=initializer_range,
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
    vision = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_heads,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=64,  # an 8 x 8 learned grid, resampled to each image's patches
        deepstack_visual_indexes=list(deepstack_layers),
        initializer_range=initializer_range,
    )
    config_cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return config_cls(text_config=text, vision_config=vision, **_TOKEN_IDS)


def build_tiny_qwen3_vl(
    vocab_size: int | None = None,
    moe: bool = False,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration:
    """A randomly initialised tiny model (eval mode) whose weights depend only on `seed` and the config.

    `vocab_size` defaults to the size of `build_qwen3_vl_tokenizer()`'s vocabulary; `config_overrides` go to
    `tiny_qwen3_vl_config`. The global RNG state is left untouched.
    """
    if vocab_size is None:
        vocab_size = len(build_qwen3_vl_tokenizer())
    config = tiny_qwen3_vl_config(vocab_size, moe=moe, **config_overrides)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    model_cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        max_new_tokens=16,
        do_sample=False,
    )
    return model


def build_tiny_qwen3_vl_checkpoint(
    path: str | Path,
    moe: bool = False,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    **config_overrides: Any,
) -> Path:
    """Build a random tiny Qwen3-VL checkpoint + processor and save both to `path`, ready for
    `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` (and so for
    `python src/run.py model=qwen3_vl_2b model.path=<path>`). Needs torchvision, like every Qwen processor in
    transformers 5."""
    if not has_video_processor():
        raise ImportError(
            "a Qwen3-VL checkpoint folder must hold a video processor for AutoProcessor to load it, which "
            "needs torchvision: pip install torchvision"
        )
    processor = build_qwen3_vl_processor(words, images_only=False)
    model = build_tiny_qwen3_vl(len(processor.tokenizer), moe=moe, seed=seed, **config_overrides)
    return save_checkpoint(model, processor, Path(path))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_qwen3_vl OUT_DIR [--moe]`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_qwen3_vl",
        description="Write a tiny random Qwen3-VL (or Qwen3-VL-MoE) checkpoint.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument(
        "--moe", action="store_true", help="the MoE class (Qwen3VLMoeForConditionalGeneration)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    path = build_tiny_qwen3_vl_checkpoint(
        args.out_dir, moe=args.moe, seed=args.seed, text_layers=args.text_layers, hidden=args.hidden
    )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
