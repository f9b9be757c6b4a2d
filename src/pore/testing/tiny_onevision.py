"""A tiny LLaVA-OneVision-architecture checkpoint with its own processor, built offline.

The real architecture (`LlavaOnevisionForConditionalGeneration`: a SigLIP vision tower without [CLS], a
2-layer GELU projector, a Qwen2 decoder) at toy sizes, with LLaVA-OneVision's "anyres_max" image processing:
each image becomes a base view (the whole image squashed to one encoder input) plus the tiles of the best of
`image_grid_pinpoints`; the model unpads the tiles' features to the image's aspect ratio, shrinks the grid
bilinearly when it holds more than `max_tiles` tiles' worth of tokens (x 1.1), and ends every row with an
`image_newline` token. A sample with several images gets only each image's base view plus one newline.

The tokenizer and chat template are `pore.testing.tiny_llava`'s word-level ones (plus a `<video>` token):
the prompt format does not matter to pruning, the token layout does.

Pieces, each usable on its own:

- `build_onevision_image_processor`: `LlavaOnevisionImageProcessorPil` (the PIL backend: no torchvision);
- `build_onevision_processor`: that + the tokenizer + the chat template, as a `LlavaOnevisionProcessor`
  (or, without torchvision, which its video processor needs, the image-only subclass);
- `tiny_onevision_config`: a `LlavaOnevisionConfig` with small defaults: 32 px encoder input, 8 px patches
  (a 4 x 4 base grid), pinpoints 32 x 32, 32 x 64, 64 x 32 and 64 x 64, `anyres_max_2`;
- `build_tiny_onevision_checkpoint`: all of the above, randomly initialised from a seed and saved to a folder.

Command line: ``python -m pore.testing.tiny_onevision OUT_DIR``.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from pore.testing.tiny_llava import DEFAULT_WORDS, IMAGE_TOKEN, build_tokenizer, save_checkpoint

__all__ = [
    "VIDEO_TOKEN",
    "ImageOnlyLlavaOnevisionProcessor",
    "build_onevision_image_processor",
    "build_onevision_processor",
    "build_onevision_tokenizer",
    "build_tiny_onevision_checkpoint",
    "build_tiny_onevision_model",
    "onevision_pinpoints",
    "tiny_onevision_config",
]

VIDEO_TOKEN = "<video>"
DEFAULT_MAX_TILES = 2  # "anyres_max_2": a 2 x 2-tile image (8 x 8 tokens) is shrunk to 5 x 5


def onevision_pinpoints(image_size: int) -> list[list[int]]:
    """Anyres canvases (height, width) of 1 x 1 to 2 x 2 encoder inputs (a corner of llava-onevision's)."""
    return [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]


def build_onevision_image_processor(
    image_size: int, pinpoints: Sequence[Sequence[int]] | None = None
) -> LlavaOnevisionImageProcessorPil:
    """LLaVA-OneVision preprocessing: the base view resized to `image_size` square plus the tiles of the
    image resized into the best pinpoint (aspect ratio kept, padded), CLIP mean / std as llava-hf's."""
    return LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        image_grid_pinpoints=[list(p) for p in (pinpoints or onevision_pinpoints(image_size))],
    )


def build_onevision_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """`tiny_llava`'s word-level tokenizer with a `<video>` token, which the processor needs an id for."""
    tokenizer = build_tokenizer(words)
    tokenizer.add_tokens([VIDEO_TOKEN], special_tokens=True)
    return tokenizer


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without its video processor (which needs torchvision).

    transformers lists a processor's parts from its `__init__` signature; this one has no `video_processor`,
    so the real `__init__` (handed `video_processor=None`) checks and stores the image processor and the
    tokenizer only. Prompts and image outputs are the real class's. Saved, it cannot be loaded back with
    `AutoProcessor` (which looks for the video processor), as for `pore.testing.tiny_qwen`.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: Any = None,
        image_token: str = IMAGE_TOKEN,
        video_token: str = VIDEO_TOKEN,
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
        )


def has_video_processor() -> bool:
    """Whether LLaVA-OneVision's video processor can be built here (transformers needs torchvision)."""
    return importlib.util.find_spec("torchvision") is not None


def build_onevision_processor(
    image_size: int,
    patch_size: int,
    pinpoints: Sequence[Sequence[int]] | None = None,
    words: Iterable[str] = DEFAULT_WORDS,
    max_tiles: int = DEFAULT_MAX_TILES,
    images_only: bool | None = None,
) -> LlavaOnevisionProcessor:
    """The checkpoint's processor: each `<image>` becomes as many tokens as the model packs for that image.

    `images_only=None` builds the real class (with its video processor) when torchvision is installed and
    `ImageOnlyLlavaOnevisionProcessor` otherwise; True / False force one or the other.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    images_only = not has_video_processor() if images_only is None else images_only
    tokenizer = build_onevision_tokenizer(words)
    parts: dict[str, Any] = {}
    cls: type[LlavaOnevisionProcessor] = ImageOnlyLlavaOnevisionProcessor
    if not images_only:
        if not has_video_processor():
            raise ImportError("LLaVA-OneVision's video processor needs torchvision: pip install torchvision")
        from transformers import LlavaOnevisionVideoProcessor

        parts["video_processor"] = LlavaOnevisionVideoProcessor(
            size={"height": image_size, "width": image_size}
        )
        cls = LlavaOnevisionProcessor
    return cls(
        **parts,
        image_processor=build_onevision_image_processor(image_size, pinpoints),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",  # SigLIP has no [CLS] to drop
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )


def tiny_onevision_config(
    vocab_size: int,
    image_token_id: int,
    video_token_id: int,
    pad_token_id: int,
    grid: int = 4,
    patch_size: int = 8,
    pinpoints: Sequence[Sequence[int]] | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    text_layers: int = 4,
    hidden: int = 64,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    *,
    initializer_range: float = 0.2,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision-shaped config: SigLIP (grid x grid patches, no [CLS]) + Qwen2 decoder.

    `initializer_range` 0.2 (not 0.02) makes a random model's attention peaked, as in `tiny_llava`.
    """
    image_size = grid * patch_size
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,  # llava-onevision's tower has no pooling head
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        image_grid_pinpoints=[list(p) for p in (pinpoints or onevision_pinpoints(image_size))],
        image_seq_length=grid * grid,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
    )


def build_tiny_onevision_model(
    processor: LlavaOnevisionProcessor, seed: int = 0, **config_overrides: Any
) -> LlavaOnevisionForConditionalGeneration:
    """A random-weights model that fits `processor`; weights depend only on `seed` and the config."""
    tokenizer = processor.tokenizer
    image_processor = processor.image_processor
    image_size = image_processor.size["height"]
    grid = round(processor.num_image_tokens**0.5)
    config = tiny_onevision_config(
        vocab_size=len(tokenizer),
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        pad_token_id=tokenizer.pad_token_id,
        grid=grid,
        patch_size=image_size // grid,
        pinpoints=image_processor.image_grid_pinpoints,
        max_tiles=int(processor.vision_aspect_ratio.removeprefix("anyres_max_")),
        **{
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **config_overrides,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=16,
        do_sample=False,
    )
    return model


def build_tiny_onevision_checkpoint(
    path: str | Path,
    grid: int = 4,
    patch_size: int = 8,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    **config_overrides: Any,
) -> Path:
    """Build a random-weights LLaVA-OneVision checkpoint + processor and save both to `path`, ready for
    `AutoProcessor` / `python src/run.py model.path=<path>`. Needs torchvision, like the real processor's
    video part (which `AutoProcessor` loads)."""
    if not has_video_processor():
        raise ImportError(
            "a LLaVA-OneVision checkpoint folder must hold a video processor for AutoProcessor to load it, "
            "which needs torchvision: pip install torchvision"
        )
    processor = build_onevision_processor(grid * patch_size, patch_size, words=words, images_only=False)
    model = build_tiny_onevision_model(processor, seed, **config_overrides)
    return save_checkpoint(model, processor, Path(path))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_onevision OUT_DIR [--grid 4 ...]`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_onevision",
        description="Write a tiny random LLaVA-OneVision checkpoint (offline).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument("--grid", type=int, default=4, help="base-view tokens per side (default 4)")
    parser.add_argument("--patch-size", type=int, default=8, help="pixels per patch side (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    path = build_tiny_onevision_checkpoint(
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
