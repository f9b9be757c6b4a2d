"""A tiny LLaVA-NeXT-architecture checkpoint with its own processor, built offline.

The LLaVA-NeXT counterpart of `pore.testing.tiny_llava`: the same word-level tokenizer and chat template
(llava-v1.6-vicuna
uses llava-1.5's `USER: <image>\\n... ASSISTANT:` format), with LLaVA-NeXT's "anyres" image processing. Each
image becomes a base view (the whole image squashed to one vision-encoder input) plus the tiles of the best
of `image_grid_pinpoints`; the model unpads the tiles' features back to the image's aspect ratio and ends
every row of them with an `image_newline` token, so the number of image tokens depends on the image size.

Pieces, each usable on its own:

- `build_next_image_processor`: `LlavaNextImageProcessorPil` (the PIL backend: no torchvision needed);
- `build_next_processor`: that + `pore.testing.tiny_llava.build_tokenizer` + the chat template, as a
  `LlavaNextProcessor`;
- `tiny_llava_next_config`: a `LlavaNextConfig` (CLIP vision tower + Llama) with small defaults: 32 px
  encoder input, 8 px patches (a 4 x 4 base grid), pinpoints 32 x 64, 64 x 32 and 64 x 64;
- `build_tiny_next_checkpoint`: all of the above, randomly initialised from a seed and saved to a folder.

Command line: ``python -m pore.testing.tiny_next OUT_DIR``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from pore.testing.tiny_llava import (
    CHAT_TEMPLATE,
    DEFAULT_WORDS,
    IMAGE_TOKEN,
    build_tokenizer,
    save_checkpoint,
    tiny_llava_config,
)

__all__ = [
    "build_next_image_processor",
    "build_next_processor",
    "build_tiny_next_checkpoint",
    "build_tiny_next_model",
    "default_pinpoints",
    "tiny_llava_next_config",
]


def default_pinpoints(image_size: int) -> list[list[int]]:
    """Anyres canvases (height, width) of 1 x 2, 2 x 1 and 2 x 2 encoder inputs (a subset of llava-v1.6's)."""
    return [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]


def build_next_image_processor(
    image_size: int, pinpoints: Sequence[Sequence[int]] | None = None
) -> LlavaNextImageProcessorPil:
    """LLaVA-NeXT preprocessing: the base view resized to `image_size` square, plus the tiles of the image
    resized to fit the best pinpoint (aspect ratio kept, centred on a black canvas), CLIP mean / std.

    The PIL backend is named explicitly (the default one needs torchvision); the saved folder records
    `LlavaNextImageProcessor`, so `AutoProcessor` picks whichever backend the loading machine has.
    """
    return LlavaNextImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
        do_pad=True,
        image_grid_pinpoints=[list(p) for p in (pinpoints or default_pinpoints(image_size))],
    )


def build_next_processor(
    image_size: int,
    patch_size: int,
    pinpoints: Sequence[Sequence[int]] | None = None,
    words: Iterable[str] = DEFAULT_WORDS,
) -> LlavaNextProcessor:
    """The checkpoint's processor: each `<image>` becomes as many tokens as the model packs for that image.

    `num_additional_image_tokens=1` counts CLIP's CLS token, which the "default" feature strategy drops
    again (llava-v1.6's processors are configured the same way).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    return LlavaNextProcessor(
        image_processor=build_next_image_processor(image_size, pinpoints),
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def tiny_llava_next_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    grid: int = 4,
    patch_size: int = 8,
    pinpoints: Sequence[Sequence[int]] | None = None,
    **overrides: Any,
) -> LlavaNextConfig:
    """A LLaVA-NeXT-shaped config: the vision tower and Llama decoder of
    `pore.testing.tiny_llava.tiny_llava_config`
    (`overrides` go there: `text_layers`, `hidden`, `initializer_range`, ...), with anyres pinpoints.

    The encoder input is grid * patch_size pixels square, so the base view gives grid x grid tokens and each
    anyres tile another grid x grid before unpadding.
    """
    llava = tiny_llava_config(vocab_size, image_token_id, pad_token_id, grid, patch_size, **overrides)
    image_size = grid * patch_size
    return LlavaNextConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_index=image_token_id,
        projector_hidden_act=llava.projector_hidden_act,
        vision_feature_layer=llava.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[list(p) for p in (pinpoints or default_pinpoints(image_size))],
        image_seq_length=grid * grid,
        initializer_range=llava.initializer_range,
        tie_word_embeddings=llava.tie_word_embeddings,
    )


def build_tiny_next_model(
    processor: LlavaNextProcessor, seed: int = 0, **config_overrides: Any
) -> LlavaNextForConditionalGeneration:
    """A random-weights model that fits `processor` (vocabulary, image size, patch size, pinpoints).

    The weights depend only on `seed` and the config (the global RNG state is left untouched).
    """
    tokenizer = processor.tokenizer
    image_processor = processor.image_processor
    image_size = image_processor.crop_size["height"]
    config = tiny_llava_next_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        grid=image_size // processor.patch_size,
        patch_size=processor.patch_size,
        pinpoints=image_processor.image_grid_pinpoints,
        **{
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **config_overrides,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=16,
        do_sample=False,
    )
    return model


def build_tiny_next_checkpoint(
    path: str | Path,
    grid: int = 4,
    patch_size: int = 8,
    pinpoints: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    **config_overrides: Any,
) -> Path:
    """Build a random-weights LLaVA-NeXT checkpoint + processor and save both to `path` (created if needed).

    Returns the folder, ready for `from_pretrained` / `python src/run.py model.path=<folder>`.
    """
    path = Path(path)
    processor = build_next_processor(grid * patch_size, patch_size, pinpoints, words)
    model = build_tiny_next_model(processor, seed, **config_overrides)
    return save_checkpoint(model, processor, path)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_next OUT_DIR [--grid 4 ...]`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_next",
        description="Write a tiny random LLaVA-NeXT checkpoint (offline).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument("--grid", type=int, default=4, help="base-view tokens per side (default 4)")
    parser.add_argument("--patch-size", type=int, default=8, help="pixels per patch side (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    path = build_tiny_next_checkpoint(
        args.out_dir,
        grid=args.grid,
        patch_size=args.patch_size,
        seed=args.seed,
        text_layers=args.text_layers,
        hidden=args.hidden,
    )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
