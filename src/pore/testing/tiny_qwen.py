"""Tiny Qwen2-VL / Qwen2.5-VL models with their own tokenizer and processor, built offline.

The Qwen adapter tests (and anyone who wants to try the pruner on a Qwen-architecture model without the hub)
need the real transformers classes with a dynamic image grid: `Qwen2VLImageProcessor` resizes each image to
a multiple of patch_size * merge_size and the language model sees (h / merge) x (w / merge) tokens per image,
so images of different sizes give grids of different shapes. Everything here is small enough for a CPU.

Pieces, each usable on its own:

- `build_qwen_tokenizer`: a word-level tokenizer (see `pore.testing.tiny_llava`) with Qwen's special tokens
  (<|endoftext|> = padding, <|im_start|>, <|im_end|> = end of turn, <|vision_start|>, <|image_pad|>, ...);
- `QWEN_CHAT_TEMPLATE`: Qwen2-VL's chat format (`<|im_start|>user\\n<|vision_start|><|image_pad|>
  <|vision_end|>question<|im_end|>\\n<|im_start|>assistant\\n`), with its default system turn;
- `build_qwen_image_processor`: Qwen2-VL's image preprocessing with small patches and pixel limits: with the
  defaults (patch 7, merge 2) every 14 x 14 pixels become one language-model token, so a 56 x 56 image gives
  a 4 x 4 grid and a 42 x 70 image a 3 x 5 grid;
- `build_qwen_processor`: the above as a Qwen2-VL / Qwen2.5-VL processor;
- `tiny_qwen_config` / `build_tiny_qwen`: a `Qwen2VLConfig` or `Qwen2_5_VLConfig` and its randomly
  initialised model;
- `build_tiny_qwen_checkpoint`: model + processor saved to a folder that loads with `from_pretrained`.

transformers 5.x only builds Qwen's processors with a video processor, which needs torchvision. Without
torchvision, `build_qwen_processor` returns an image-only subclass of the real processor (same prompts, same
outputs for images; it cannot be loaded back with `AutoProcessor`), and `build_tiny_qwen_checkpoint` refuses.

Command line: ``python -m pore.testing.tiny_qwen OUT_DIR --family qwen2_5_vl``.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import WordLevel
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from pore.testing.tiny_llava import DEFAULT_WORDS, _normalizer, _pre_tokenizer, save_checkpoint, vocabulary

__all__ = [
    "FAMILIES",
    "IMAGE_TOKEN",
    "QWEN_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen2_5_VLProcessor",
    "QwenFamily",
    "build_qwen_image_processor",
    "build_qwen_processor",
    "build_qwen_tokenizer",
    "build_tiny_qwen",
    "build_tiny_qwen_checkpoint",
    "has_video_processor",
    "tiny_qwen_config",
]

QwenFamily = Literal["qwen2_vl", "qwen2_5_vl"]
FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
UNK_TOKEN = "<unk>"  # Qwen's byte-level BPE has none; a word-level vocabulary needs one
# Fixed order, so the special ids never depend on the word list: <|endoftext|> = 0, ..., <unk> = 7.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    UNK_TOKEN,
)

# Config fields that hold special token ids, and the token each one is by default.
_TOKEN_FIELDS = {
    "image_token_id": IMAGE_TOKEN,
    "video_token_id": VIDEO_TOKEN,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}

# Qwen2-VL's (and Qwen2.5-VL's) chat format as in their hub chat templates: a default system turn, each
# message as <|im_start|>role\n...<|im_end|>\n, each image as <|vision_start|><|image_pad|><|vision_end|> at
# its place among the content parts (the processor expands <|image_pad|> to one token per grid cell).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
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

# Words of the default system turn and of `add_vision_id`, so that rendered prompts hold no <unk>.
TEMPLATE_WORDS: tuple[str, ...] = ("you", "are", "a", "helpful", "assistant", ".", "picture", "video", ":")


def build_qwen_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` with Qwen2-VL's special tokens (ids 0-7, see QWEN_SPECIAL_TOKENS).

    Like Qwen's own tokenizer it adds no BOS token, pads with <|endoftext|> and ends a turn with <|im_end|>
    (its eos). The special tokens are matched before normalisation, so runs of <|image_pad|> (what the
    processor writes) are never split. Padding is on the left for batched generation. Newlines are
    whitespace to this tokenizer: they separate words but are not tokens.
    """
    vocab = {
        token: index
        for index, token in enumerate(
            vocabulary((*words, *TEMPLATE_WORDS), special_tokens=QWEN_SPECIAL_TOKENS)
        )
    }
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    # Already in the vocabulary: this only marks them as special, whole-string matches with their ids.
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_qwen_image_processor(
    patch_size: int = 7,
    merge_size: int = 2,
    min_pixels: int = 28 * 28,
    max_pixels: int = 112 * 112,
    temporal_patch_size: int = 2,
) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image preprocessing, scaled down.

    Each image is resized (aspect ratio kept) to multiples of `patch_size * merge_size` pixels with an area in
    [min_pixels, max_pixels], cut into patch_size patches (the grid (1, h, w) of `image_grid_thw`), and the
    language model sees one token per merge_size x merge_size patches: (h / merge) x (w / merge) tokens. The
    defaults give one token per 14 x 14 pixels and at most 8 x 8 tokens.

    The PIL backend is named explicitly (the default backend needs torchvision); the saved folder records
    `Qwen2VLImageProcessor`, so `AutoProcessor` picks whichever backend the loading machine has.
    """
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
    )


def has_video_processor() -> bool:
    """Whether Qwen's video processor can be built here (transformers needs torchvision for it)."""
    return importlib.util.find_spec("torchvision") is not None


class _ImagesOnly:
    """Build a Qwen processor without its video processor (for machines without torchvision).

    transformers lists a processor's parts from its `__init__` signature; this signature has no
    `video_processor`, so the real `__init__` (which still passes `video_processor=None` on) only checks and
    stores the image processor and the tokenizer. Prompts and image outputs are those of the real class.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs
    ):
        super().__init__(  # type: ignore[call-arg]
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
        )


class ImageOnlyQwen2VLProcessor(_ImagesOnly, Qwen2VLProcessor):
    """`Qwen2VLProcessor` for images only (no torchvision needed)."""


class ImageOnlyQwen2_5_VLProcessor(_ImagesOnly, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` for images only (no torchvision needed)."""


def build_qwen_processor(
    family: QwenFamily = "qwen2_vl",
    words: Iterable[str] = DEFAULT_WORDS,
    images_only: bool | None = None,
    **image_processor_options: Any,
) -> Qwen2VLProcessor | Qwen2_5_VLProcessor:
    """The family's processor over `build_qwen_tokenizer(words)` and `build_qwen_image_processor(...)`.

    `images_only=None` builds the real class (with Qwen's video processor) when torchvision is installed and
    the image-only subclass otherwise; True / False force one or the other.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown Qwen family {family!r}; choose one of: {', '.join(FAMILIES)}")
    images_only = not has_video_processor() if images_only is None else images_only
    parts = dict(
        image_processor=build_qwen_image_processor(**image_processor_options),
        tokenizer=build_qwen_tokenizer(words),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    if images_only:
        cls = ImageOnlyQwen2VLProcessor if family == "qwen2_vl" else ImageOnlyQwen2_5_VLProcessor
        return cls(**parts)
    if not has_video_processor():
        raise ImportError(
            "Qwen's video processor needs torchvision: pip install torchvision (or images_only=True)"
        )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = parts["image_processor"]
    video = Qwen2VLVideoProcessor(
        patch_size=image_processor.patch_size,
        temporal_patch_size=image_processor.temporal_patch_size,
        merge_size=image_processor.merge_size,
    )
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(video_processor=video, **parts)


def tiny_qwen_config(
    family: QwenFamily,
    vocab_size: int,
    pad_token_id: int = 0,
    eos_token_id: int | None = 2,
    patch_size: int = 7,
    merge_size: int = 2,
    text_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    *,
    intermediate: int | None = None,
    mrope_section: Sequence[int] | None = None,
    temporal_patch_size: int = 2,
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.2,
    special_token_ids: dict[str, int] | None = None,
) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """A small Qwen2-VL or Qwen2.5-VL config: the real vision tower (patch embedding, rotary ViT blocks, 2 x 2
    patch merger into `hidden`) and the real Qwen2 decoder with 3-D M-RoPE and grouped-query attention.

    `mrope_section` splits the rotary half-dimension (head_dim / 2) between time, height and width; the
    default gives height and width the larger shares, like the real models ([16, 24, 24] of 64).
    Qwen2.5-VL's window attention uses windows of 2 x 2 merged tokens, with full attention in the last
    vision block. `special_token_ids` default to QWEN_SPECIAL_TOKENS' ids. `initializer_range` is 0.2 (not
    0.02) so that a random model's attention is peaked and pruning choices are well separated.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown Qwen family {family!r}; choose one of: {', '.join(FAMILIES)}")
    head_dim = hidden // heads
    if mrope_section is None:
        half = head_dim // 2
        spatial = (half - half // 4) // 2
        mrope_section = [half - 2 * spatial, spatial, spatial]
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim / 2 = {head_dim // 2}")
    ids = {name: QWEN_SPECIAL_TOKENS.index(token) for name, token in _TOKEN_FIELDS.items()}
    ids.update(special_token_ids or {})
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        initializer_range=initializer_range,
        use_sliding_window=False,
    )
    vision = _vision_config(
        family,
        patch_size,
        merge_size,
        temporal_patch_size,
        hidden,
        vision_hidden,
        vision_layers,
        vision_heads,
    )
    vision["initializer_range"] = initializer_range
    config_cls = Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig
    return config_cls(text_config=text, vision_config=vision, **ids)


def _vision_config(
    family: QwenFamily,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    hidden: int,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
) -> dict[str, Any]:
    """The vision tower's settings: Qwen2-VL's (`embed_dim`, MLP ratio) or Qwen2.5-VL's (windows of 2 x 2
    merged tokens, full attention in the last block)."""
    vision: dict[str, Any] = dict(
        depth=vision_layers,
        num_heads=vision_heads,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    if family == "qwen2_vl":
        return vision | dict(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
    return vision | dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        out_hidden_size=hidden,
        window_size=2 * merge_size * patch_size,
        fullatt_block_indexes=[vision_layers - 1],
    )


def build_tiny_qwen(
    family: QwenFamily = "qwen2_vl",
    vocab_size: int | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised tiny model (eval mode) whose weights depend only on `seed` and the config.

    `vocab_size` defaults to the size of `build_qwen_tokenizer()`'s vocabulary; `config_overrides` go to
    `tiny_qwen_config`. The global RNG state is left untouched.
    """
    if vocab_size is None:
        vocab_size = len(build_qwen_tokenizer())
    config = tiny_qwen_config(family, vocab_size, **config_overrides)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    model_cls = (
        Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    )
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


def build_tiny_qwen_checkpoint(
    path: str | Path,
    family: QwenFamily = "qwen2_vl",
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    image_processor_options: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Path:
    """Build a random tiny Qwen checkpoint + processor and save both to `path`, ready for
    `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` (and so for
    `python src/run.py model.path=<path>`). Needs torchvision, like every Qwen processor in transformers 5.
    """
    if not has_video_processor():
        raise ImportError(
            "a Qwen checkpoint folder must hold a video processor for AutoProcessor to load it, which needs "
            "torchvision: pip install torchvision"
        )
    path = Path(path)
    processor = build_qwen_processor(family, words, images_only=False, **(image_processor_options or {}))
    image_processor = processor.image_processor
    config_overrides.setdefault("patch_size", image_processor.patch_size)
    config_overrides.setdefault("merge_size", image_processor.merge_size)
    config_overrides.setdefault("temporal_patch_size", image_processor.temporal_patch_size)
    model = build_tiny_qwen(family, vocab_size=len(processor.tokenizer), seed=seed, **config_overrides)
    return save_checkpoint(model, processor, path)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_qwen OUT_DIR [--family qwen2_5_vl ...]`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_qwen",
        description="Write a tiny random Qwen2-VL / Qwen2.5-VL checkpoint.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    path = build_tiny_qwen_checkpoint(
        args.out_dir, args.family, seed=args.seed, text_layers=args.text_layers, hidden=args.hidden
    )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
