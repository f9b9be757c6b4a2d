"""A tiny Gemma 3 (`Gemma3ForConditionalGeneration`) with random weights, built offline in a second.

The real architecture at toy sizes: a SigLIP vision tower (no [CLS]), Gemma 3's projector (average pooling
of the patch grid to `mm_tokens_per_image` tokens, soft-embedding norm, projection), and a Gemma 3 language
model that interleaves sliding-window and global layers with their own RoPE bases. The default sliding window
(8 tokens) is shorter than a prompt with one image (16 image tokens), so that the window matters in the
tests.

Prompts are written with token ids (`gemma3_prompt`), as Gemma 3's processor lays them out: each image is
`<start_of_image>`, `mm_tokens_per_image` image tokens, `<end_of_image>`; `token_type_ids` mark the image
tokens (1), which the model reads to let the tokens of one image attend to each other both ways.

For the pipeline, `build_tiny_gemma3_checkpoint` saves the model with the real `Gemma3Processor`: Gemma 3's
image preprocessing (PIL backend: no torchvision needed) and a word-level tokenizer with Gemma's special
tokens at fixed ids. Command line: ``python -m pore.testing.tiny_gemma3 OUT_DIR``.
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
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from pore.testing.tiny_llava import DEFAULT_WORDS, _normalizer, _pre_tokenizer, save_checkpoint, vocabulary

__all__ = [
    "BOI_TOKEN",
    "EOI_TOKEN",
    "GEMMA3_CHAT_TEMPLATE",
    "GEMMA3_SPECIAL_TOKENS",
    "IMAGE_TOKEN",
    "build_gemma3_processor",
    "build_gemma3_tokenizer",
    "build_tiny_gemma3",
    "build_tiny_gemma3_checkpoint",
    "gemma3_prompt",
    "tiny_gemma3_config",
]

# Fixed order, so the special ids never depend on the word list; the first three as in Gemma's vocabulary.
GEMMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<end_of_turn>",
    "<image_soft_token>",
    "<start_of_image>",
    "<end_of_image>",
    "<start_of_turn>",
)
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, END_OF_TURN = 0, 1, 2, 4
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = 5, 6, 7  # <image_soft_token>, <start_of_image>, <end_of_image>

# Gemma 3's chat format (its hub template without system turns): <bos>, each turn as
# <start_of_turn>role\n...<end_of_turn>\n with the assistant as "model", each image as <start_of_image>
# (which the processor expands to \n\n<start_of_image>, the image tokens, <end_of_image>\n\n).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEMPLATE_WORDS: tuple[str, ...] = ("user", "model")


def build_gemma3_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` with Gemma 3's special tokens (`GEMMA3_SPECIAL_TOKENS`, ids 0-8),
    which are matched whole before normalisation (runs of image tokens are never split). The chat template
    writes <bos>; the tokenizer adds nothing. Padding is on the left for batched generation."""
    specials = GEMMA3_SPECIAL_TOKENS
    vocab = {
        token: i for i, token in enumerate(vocabulary((*words, *TEMPLATE_WORDS), special_tokens=specials))
    }
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return tokenizer


def build_gemma3_processor(
    image_size: int = 32, tokens_per_image: int = 16, words: Iterable[str] = DEFAULT_WORDS
) -> Gemma3Processor:
    """The real `Gemma3Processor`: images resized to `image_size` squares (Gemma's preprocessing, PIL
    backend), each `<start_of_image>` of a prompt expanded to `tokens_per_image` image tokens."""
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_gemma3_tokenizer(words),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )


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
    then `suffix` (text token ids)."""
    ids = [BOS_TOKEN, *prefix]
    for _ in range(images):
        ids += [BOI_TOKEN, *([IMAGE_TOKEN] * tokens_per_image), EOI_TOKEN]
    return ids + list(suffix)


def build_tiny_gemma3_checkpoint(
    path: str | Path, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **config: Any
) -> Path:
    """A random tiny Gemma 3 and its processor saved to `path`, ready for `AutoProcessor` /
    `AutoModelForImageTextToText.from_pretrained` (and so for `python src/run.py model.path=<path>`)."""
    image_size, tokens = config.setdefault("image_size", 32), config.setdefault("tokens_per_image", 16)
    processor = build_gemma3_processor(image_size, tokens, words)
    model = build_tiny_gemma3(seed=seed, vocab_size=len(processor.tokenizer), **config)
    model.generation_config.eos_token_id = [EOS_TOKEN, END_OF_TURN]
    return save_checkpoint(model, processor, Path(path))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_gemma3 OUT_DIR [--seed N --text-layers N]`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_gemma3", description="Write a tiny random Gemma 3 checkpoint."
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=4)
    args = parser.parse_args(argv)
    path = build_tiny_gemma3_checkpoint(args.out_dir, seed=args.seed, text_layers=args.text_layers)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
