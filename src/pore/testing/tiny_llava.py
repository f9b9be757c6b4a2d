"""A tiny LLaVA-1.5-architecture checkpoint with its own processor, built offline.

The end-to-end tests of the evaluation pipeline need a checkpoint that loads exactly like a real one
(`LlavaForConditionalGeneration.from_pretrained(path)`, `AutoProcessor.from_pretrained(path)`) but that
is built here, in seconds, with nothing downloaded. The same builder is the starting point of a small
model trained from scratch, so every dimension is a parameter and the vocabulary is a word list.

Pieces, each usable on its own:

- `build_tokenizer`: a word-level tokenizer (one token per lower-cased word or punctuation mark) made with
  the `tokenizers` library, so no pretrained vocabulary is needed;
- `CHAT_TEMPLATE`: llava-1.5's `USER: <image>\\n{text} ASSISTANT:` format;
- `build_processor`: CLIP-style image preprocessing + the tokenizer + the chat template, as a
  `LlavaProcessor` that expands each `<image>` into one token per patch;
- `tiny_llava_config`: a `LlavaConfig` (CLIP vision tower + Llama language model) with small defaults;
- `build_tiny_checkpoint`: all of the above, randomly initialised from a seed and saved to a folder.

Command line: ``python -m pore.testing.tiny_llava OUT_DIR --grid 8``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_WORDS",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "build_image_processor",
    "build_processor",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "tiny_llava_config",
    "vocabulary",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
# Fixed order, so that the special ids never depend on the word list: <pad> = 0, <s> = 1, ..., <image> = 4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)

# The chat template writes "USER:" / "ASSISTANT:"; after lower-casing and punctuation splitting these are the
# words "user", "assistant" and ":", which must be in the vocabulary or every prompt would start with <unk>.
ROLE_WORDS: tuple[str, ...] = ("user", "assistant", "system", ":")

VQA_SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
VQA_MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


def _words(text: str) -> tuple[str, ...]:
    """Whitespace-separated word lists, so that the vocabulary below reads as text, not 200 quoted items."""
    return tuple(text.split())


_NUMBER_WORDS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
)
_QUESTION_WORDS = _words(
    "what which who whom whose where when why how many much is are was were do does did can could "
    "there here the a an of in on at to by with it its this that these those and or not no any some "
    "all each every one other than more most fewer less same different both either neither "
    "color colour colors colours shape shapes number count size big small large tiny image picture "
    "photo object objects thing things item items kind type side part "
    "visible shown see seen contain contains containing has have located position place"
)
_COLOUR_WORDS = _words(
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet gold silver"
)
_SHAPE_WORDS = _words(
    "circle circles square squares triangle triangles rectangle rectangles star stars cross crosses "
    "diamond diamonds ellipse ellipses oval ovals hexagon hexagons pentagon pentagons heart hearts "
    "line lines dot dots"
)
_ANSWER_WORDS = _words("yes no none true false")
_POSITION_WORDS = _words(
    "top bottom left right middle center centre upper lower corner half above below beside next between"
)
_LETTERS = ("A", "B", "C", "D", "E")
_PUNCTUATION = (".", ",", "?", "!", ":", ";", "'", '"', "(", ")", "-")

DEFAULT_WORDS: tuple[str, ...] = (
    *(str(n) for n in range(21)),
    *_NUMBER_WORDS,
    *_QUESTION_WORDS,
    *_COLOUR_WORDS,
    *_SHAPE_WORDS,
    *_ANSWER_WORDS,
    *_POSITION_WORDS,
    *_LETTERS,
    *_PUNCTUATION,
    VQA_SHORT_ANSWER_SUFFIX,
    VQA_MULTIPLE_CHOICE_SUFFIX,
)
"""Words of the default vocabulary: enough for synthetic colour / shape / count / position questions and
the standard VQA answer-format suffixes. Entries may be phrases; they are split like the tokenizer splits."""

# llava-1.5's conversation format ("USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."), written like
# llava-hf's chat template: in each turn the images first, then the text, prefixed by the upper-cased role;
# "ASSISTANT:" appended for generation. `content` may be a list of typed parts or a plain string. An
# assistant turn ends with </s> (as in llava-1.5's training data, so a model trained on rendered
# conversations learns to stop); its text and </s> sit in {% generation %} for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' ' }}{% endif %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ content['text'] + '</s>' }}{% endgeneration %}"
    "{% else %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _normalizer() -> normalizers.Normalizer:
    """Lower-case everything: a small vocabulary should not spend ids on "What" vs "what"."""
    return normalizers.Lowercase()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Whitespace, then every punctuation character on its own: "circle?" -> "circle", "?"."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def vocabulary(words: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS) -> list[str]:
    """The word-level vocabulary for `words`: the special tokens, then the sorted distinct pieces.

    Each entry is normalised and split exactly like the tokenizer does, so phrases ("option's letter") give
    the pieces the tokenizer will look up ("option", "'", "s", "letter"). Sorting makes the ids independent
    of the order (or set-ness) of `words`. `special_tokens` take the first ids, in their order (another
    model family, e.g. `pore.testing.tiny_qwen`, brings its own).
    """
    normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer()
    pieces: set[str] = set()
    for entry in (*words, *ROLE_WORDS):
        text = normalizer.normalize_str(entry)
        pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    return [*special_tokens, *sorted(pieces - set(special_tokens))]


def build_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (plus special tokens and role markers), ready for LLaVA prompts.

    Unknown words map to `<unk>`; `<s>` is prepended like Llama's tokenizer does; `<image>` is a special
    added token, matched before normalisation so that runs of `<image><image>...` (what the processor writes)
    are never split. Padding is on the left because batched generation appends to the right end.
    """
    vocab = {token: index for index, token in enumerate(vocabulary(words))}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    # WordPiece's decoder joins tokens with spaces; no word here starts with its "##" prefix. No cleanup, so
    # decoding inverts encoding exactly for normalised text ("what colour is the circle ?").
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP preprocessing as llava-1.5 uses it: resize the short side to `image_size`, centre-crop a square,
    normalise with CLIP's mean / std.

    The PIL backend is named explicitly: plain `CLIPImageProcessor` needs torchvision and otherwise falls back
    to it with a warning. Either way the folder records `"image_processor_type": "CLIPImageProcessor"`, so
    `AutoProcessor` picks whichever backend the loading machine has.
    """
    return CLIPImageProcessorPil(
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
    )


def build_processor(image_size: int, patch_size: int, words: Iterable[str] = DEFAULT_WORDS) -> LlavaProcessor:
    """The checkpoint's processor: each `<image>` in a prompt becomes (image_size / patch_size)^2 tokens.

    `num_additional_image_tokens=1` counts CLIP's CLS token and the "default" feature strategy drops it
    again, which is exactly how llava-1.5's processor is configured (576 tokens at 336 px / 14).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    grid: int = 8,
    patch_size: int = 8,
    text_layers: int = 4,
    hidden: int = 64,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    *,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    vision_intermediate: int | None = None,
    vision_heads: int = 4,
    max_position_embeddings: int = 2048,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    initializer_range: float = 0.2,
    tie_word_embeddings: bool = False,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP vision tower (CLS + grid x grid patches), 2-layer GELU projector,
    Llama decoder. The image is grid * patch_size pixels square; the LLM sees grid * grid tokens per image.

    `initializer_range` defaults to 0.2 (not 0.02) so that a random model's attention is peaked and pruning
    choices are well separated. Intermediate sizes default to twice the hidden size.
    """
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=grid * patch_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
        initializer_range=initializer_range,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=grid * grid,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_checkpoint(
    path: str | Path,
    grid: int = 8,
    patch_size: int = 8,
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    **config_overrides: Any,
) -> Path:
    """Build a random-weights LLaVA checkpoint + processor and save both to `path` (created if needed).

    The weights depend only on `seed` and the config (the global RNG state is left untouched), so two builds
    with the same arguments are identical. `config_overrides` go to `tiny_llava_config` (e.g. `hidden=128`,
    `text_layers=2`). Returns the folder, ready for `from_pretrained`.
    """
    path = Path(path)
    processor = build_processor(grid * patch_size, patch_size, words)
    tokenizer = processor.tokenizer
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        grid=grid,
        patch_size=patch_size,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=16,
        do_sample=False,
    )
    return save_checkpoint(model, processor, path)


def save_checkpoint(model: Any, processor: Any, path: Path) -> Path:
    """Save `model` and `processor` side by side in `path` (created if needed), ready for from_pretrained."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_llava OUT_DIR [--grid 8 ...]`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_llava",
        description="Write a tiny random LLaVA-1.5 checkpoint (offline).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument("--grid", type=int, default=8, help="image tokens per side (default 8)")
    parser.add_argument("--patch-size", type=int, default=8, help="pixels per patch side (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(
        args.out_dir,
        grid=args.grid,
        patch_size=args.patch_size,
        seed=args.seed,
        text_layers=args.text_layers,
        hidden=args.hidden,
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
    )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
