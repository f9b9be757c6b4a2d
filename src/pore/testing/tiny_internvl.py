"""Tiny InternVL3 models with their own tokenizer and processor, built offline.

The real transformers classes (`InternVLForConditionalGeneration`, `InternVLProcessor`) with configs small
enough for a CPU: the InternViT vision tower (patch embedding with a [CLS] token, learned position
embeddings, layer-scaled blocks), pixel shuffle (2 x 2 neighbouring patches into one token), the MLP
projector and a Qwen2 decoder, as the `OpenGVLab/InternVL3-*-hf` checkpoints. The image processor is
GOT-OCR2's (PIL backend), which cuts an image into the best grid of tiles for its aspect ratio and appends a
thumbnail of the whole image when there is more than one tile; every tile becomes (tile / patch / 2)^2
language-model tokens (the real models: 448 px tiles, patch 14, 256 tokens; here 32 px tiles, patch 4, 16
tokens, at most 4 tiles).

Pieces, each usable on its own:

- `build_internvl_tokenizer`: a word-level tokenizer with InternVL3's special tokens (Qwen2's chat tokens and
  <img>, </img>, <IMG_CONTEXT>, <video>) and the -hf chat template (each image as <IMG_CONTEXT> at its place,
  which the processor expands to <img> + <IMG_CONTEXT> x tokens per tile x tiles + </img>);
- `build_internvl_processor`: `InternVLProcessor` over it (image-only: see below);
- `tiny_internvl_config` / `build_tiny_internvl`: an `InternVLConfig` and its randomly initialised model;
- `build_tiny_internvl_checkpoint`: model + processor saved to a folder.

transformers builds `InternVLProcessor` only with its video processor, which needs torchvision; the
processor here is an image-only subclass of the real class (`ImageOnlyInternVLProcessor`: same prompts,
same image outputs), built, used and saved without torchvision. The saved folder names that class, so
`AutoProcessor` loads it where it is registered (`AutoProcessor.register`), as the run.py tests do.

Command line: ``python -m pore.testing.tiny_internvl OUT_DIR``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import WordLevel
from transformers import (
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from pore.testing.tiny_llava import DEFAULT_WORDS, _normalizer, _pre_tokenizer, save_checkpoint, vocabulary

__all__ = [
    "INTERNVL_CHAT_TEMPLATE",
    "INTERNVL_SPECIAL_TOKENS",
    "PATCH_SIZE",
    "TILE_SIZE",
    "TOKENS_PER_TILE",
    "ImageOnlyInternVLProcessor",
    "build_internvl_processor",
    "build_internvl_tokenizer",
    "build_tiny_internvl",
    "build_tiny_internvl_checkpoint",
    "tiny_internvl_config",
]

TILE_SIZE = 32  # pixels per tile side (the real models: 448)
PATCH_SIZE = 4  # vision patches of 4 x 4 pixels (the real models: 14)
TOKENS_PER_TILE = (TILE_SIZE // PATCH_SIZE // 2) ** 2  # pixel shuffle halves both sides: 16 (real: 256)

PAD_TOKEN = "<|endoftext|>"
IM_END = "<|im_end|>"
START_IMAGE = "<img>"
END_IMAGE = "</img>"
CONTEXT_IMAGE = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
UNK_TOKEN = "<unk>"
# Fixed order, so the special ids never depend on the word list: <|endoftext|> = 0, ..., <unk> = 7.
INTERNVL_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    "<|im_start|>",
    IM_END,
    START_IMAGE,
    END_IMAGE,
    CONTEXT_IMAGE,
    VIDEO_TOKEN,
    UNK_TOKEN,
)

# The -hf checkpoints' chat format: each message as <|im_start|>role\n...<|im_end|>\n, each image as
# <IMG_CONTEXT>\n at its place among the content parts (the processor expands it), each video as <video>\n.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """`InternVLProcessor` for images only (no torchvision needed): transformers lists a processor's parts
    from its `__init__` signature, and this one has no `video_processor`, so the real `__init__` (which
    still receives `video_processor=None`) only checks and stores the image processor and the tokenizer.
    Prompts and image outputs are those of the real class."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_length: int = 256,
        chat_template: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
        )


def build_internvl_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` with InternVL3's special tokens (ids 0-7, INTERNVL_SPECIAL_TOKENS)
    and the names `InternVLProcessor` reads (`start_image_token`, `end_image_token`, `context_image_token`,
    `video_token`). No BOS token, pads with <|endoftext|> on the left, ends a turn with <|im_end|> (eos)."""
    vocab = {
        token: index for index, token in enumerate(vocabulary(words, special_tokens=INTERNVL_SPECIAL_TOKENS))
    }
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in INTERNVL_SPECIAL_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={
            "start_image_token": START_IMAGE,
            "end_image_token": END_IMAGE,
            "context_image_token": CONTEXT_IMAGE,
            "video_token": VIDEO_TOKEN,
        },
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


def build_internvl_processor(
    words: Iterable[str] = DEFAULT_WORDS, max_tiles: int = 4
) -> ImageOnlyInternVLProcessor:
    """`InternVLProcessor`: GOT-OCR2's tiling (1 to `max_tiles` tiles of 32 x 32 pixels in the grid closest
    to the image's aspect ratio, plus a thumbnail when there are several) and 16 tokens per tile."""
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=build_internvl_tokenizer(words),
        image_seq_length=TOKENS_PER_TILE,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def tiny_internvl_config(
    vocab_size: int,
    text_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    *,
    pad_token_id: int = 0,
    eos_token_id: int = 2,
    initializer_range: float = 0.2,
) -> InternVLConfig:
    """A small InternVL3 config: InternViT over 32 px tiles of 4 px patches (8 x 8 patches + [CLS]), pixel
    shuffle to 4 x 4 tokens per tile, and a Qwen2 decoder. `initializer_range` is 0.2 (not 0.02) so that a
    random model's attention is peaked and pruning choices are well separated."""
    text: dict[str, Any] = dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        initializer_range=initializer_range,
    )
    vision = dict(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        intermediate_size=2 * vision_hidden,
        image_size=[TILE_SIZE, TILE_SIZE],
        patch_size=[PATCH_SIZE, PATCH_SIZE],
        initializer_range=initializer_range,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=INTERNVL_SPECIAL_TOKENS.index(CONTEXT_IMAGE),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_tiny_internvl(
    vocab_size: int | None = None, seed: int = 0, attn_implementation: str = "sdpa", **config_overrides: Any
) -> InternVLForConditionalGeneration:
    """A randomly initialised tiny model (eval mode) whose weights depend only on `seed` and the config.
    `vocab_size` defaults to `build_internvl_tokenizer()`'s; the global RNG state is left untouched."""
    if vocab_size is None:
        vocab_size = len(build_internvl_tokenizer())
    config = tiny_internvl_config(vocab_size, **config_overrides)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        max_new_tokens=16,
        do_sample=False,
    )
    return model


def build_tiny_internvl_checkpoint(
    path: str | Path, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **config_overrides: Any
) -> Path:
    """Build a random tiny InternVL3 checkpoint + processor and save both to `path` (for
    `AutoModelForImageTextToText.from_pretrained`; the processor as the module docstring says)."""
    processor = build_internvl_processor(words)
    model = build_tiny_internvl(len(processor.tokenizer), seed=seed, **config_overrides)
    return save_checkpoint(model, processor, Path(path))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_internvl OUT_DIR`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_internvl", description="Write a tiny random InternVL3 checkpoint."
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=4)
    args = parser.parse_args(argv)
    path = build_tiny_internvl_checkpoint(args.out_dir, seed=args.seed, text_layers=args.text_layers)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
