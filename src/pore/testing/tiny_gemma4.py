"""A tiny Gemma 4 (`Gemma4ForConditionalGeneration`) with random weights, built offline in a second.

The real architecture at toy sizes, with everything that makes Gemma 4 differ from Gemma 3 switched on:

- variable-resolution images: the vision tower takes each image as its own patch grid (`pixel_values`
  (images, max_patches, 3 * p * p), `image_position_ids` (images, max_patches, 2) = (x, y) of each patch,
  (-1, -1) for padding) and its pooler averages k x k patches (`pooling_kernel_size`) into one soft token,
  so an image of H x W patches gives (H / k) x (W / k) image tokens in raster order;
- per-layer input embeddings (`hidden_size_per_layer_input`): every decoder layer adds a projection of its
  own slice of a (B, L, layers, D_ple) tensor computed before the layers;
- KV sharing (`num_kv_shared_layers`): the last layers reuse the keys / values of the last earlier layer of
  their kind;
- sliding-window and full layers with their own RoPE, and (`use_bidirectional_attention="vision"`) the image
  tokens of one image attending to each other both ways in the sliding layers.

Prompts are written with token ids (`gemma4_prompt`) as Gemma 4's processor lays them out: each image is
`<|image>` (begin), its image tokens, `<image|>` (end); `mm_token_type_ids` mark the image tokens (1).
`gemma4_pixels` builds an image's patches and positions for a grid of soft tokens.

For the pipeline, `build_tiny_gemma4_checkpoint` saves the model with the real `Gemma4Processor` (its PIL
image processor, which resizes each image, keeping its aspect ratio, to at most `max_soft_tokens` tokens)
and a word-level tokenizer. Command line: ``python -m pore.testing.tiny_gemma4 OUT_DIR``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import WordLevel
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from pore.testing.tiny_llava import DEFAULT_WORDS, _normalizer, _pre_tokenizer, save_checkpoint, vocabulary

__all__ = [
    "AUDIO_TOKEN",
    "BOI_TOKEN",
    "EOI_TOKEN",
    "EOS_TOKEN",
    "GEMMA4_SPECIAL_TOKENS",
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "build_gemma4_processor",
    "build_gemma4_tokenizer",
    "build_tiny_gemma4",
    "build_tiny_gemma4_checkpoint",
    "gemma4_pixels",
    "gemma4_prompt",
    "tiny_gemma4_config",
]

# Fixed order, so the special ids never depend on the word list; the first three as in Gemma's vocabulary.
GEMMA4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<turn|>",
    "<|image|>",
    "<|image>",
    "<image|>",
    "<|turn>",
    "<|video|>",
    "<|audio|>",
    "<|audio>",
    "<audio|>",
)
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, END_OF_TURN = 0, 1, 2, 4
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = 5, 6, 7  # <|image|>, <|image>, <image|>
VIDEO_TOKEN, AUDIO_TOKEN = 9, 10

# Gemma 4's chat format at its simplest: <bos>, each turn as <|turn>role\n...<turn|>\n with the assistant as
# "model", each image as the processor's image placeholder (expanded to <|image>, its tokens, <image|>).
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
TEMPLATE_WORDS: tuple[str, ...] = ("user", "model")


def tiny_gemma4_config(
    vocab_size: int = 64,
    hidden_size: int = 32,
    layer_types: Sequence[str] | None = None,
    kv_shared_layers: int = 2,
    sliding_window: int = 8,
    per_layer_size: int = 8,
    patch_size: int = 2,
    pooling_kernel_size: int = 2,
) -> Gemma4Config:
    """A `Gemma4Config` at toy sizes. Default layers: sliding, full, sliding, full, sliding, full, sliding,
    full, of which the last `kv_shared_layers` reuse the keys / values of layers 4 (sliding) and 5 (full)."""
    if layer_types is None:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(8)]
    text = Gemma4TextConfig(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size=hidden_size,
        hidden_size_per_layer_input=per_layer_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        global_head_dim=hidden_size // 2,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        num_kv_shared_layers=kv_shared_layers,
        use_bidirectional_attention="vision",
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN,
        eos_token_id=EOS_TOKEN,
        bos_token_id=BOS_TOKEN,
    )
    vision = Gemma4VisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=hidden_size // 4,
        patch_size=patch_size,
        pooling_kernel_size=pooling_kernel_size,
        position_embedding_size=64,
    )
    return Gemma4Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        audio_config=None,
        image_token_id=IMAGE_TOKEN,
        boi_token_id=BOI_TOKEN,
        eoi_token_id=EOI_TOKEN,
        video_token_id=VIDEO_TOKEN,
        audio_token_id=AUDIO_TOKEN,
    )


def build_tiny_gemma4(
    seed: int = 0, attn_implementation: str = "sdpa", **config: Any
) -> Gemma4ForConditionalGeneration:
    """A randomly initialised tiny model (eval mode) whose weights depend only on `seed` and the config;
    the global RNG state is left untouched. `config` goes to `tiny_gemma4_config`."""
    settings = tiny_gemma4_config(**config)
    settings._attn_implementation = attn_implementation
    settings.text_config._attn_implementation = attn_implementation
    settings.vision_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(settings).eval()
        # Gemma 4 initialises the patch position table to ones (every patch at the same place) and the norm
        # gains to constants: random values give each token its own features and attention without ties.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("position_embedding_table"):
                    parameter.normal_(std=0.5)
                elif name.endswith("norm.weight"):
                    parameter.normal_(mean=1.0, std=0.1)
    model.generation_config = GenerationConfig(
        eos_token_id=EOS_TOKEN, pad_token_id=PAD_TOKEN, max_new_tokens=16, do_sample=False
    )
    return model


def gemma4_pixels(
    grids: Sequence[tuple[int, int]], seed: int, patch_size: int = 2, pooling_kernel_size: int = 2
) -> dict[str, torch.Tensor]:
    """Random images of the given soft-token grids (rows, cols), as Gemma 4's image processor hands them
    to the model: `pixel_values` (images, max_patches, 3 * p * p) in [0, 1] and `image_position_ids`
    (images, max_patches, 2) = (x, y) of each patch in raster order, padded with (-1, -1) to the largest
    image (max_patches a multiple of k * k: the pooler's output length is max_patches / k^2)."""
    k = pooling_kernel_size
    generator = torch.Generator().manual_seed(200 + seed)
    patches = [rows * k * cols * k for rows, cols in grids]
    longest = max(patches)
    values = torch.zeros(len(grids), longest, 3 * patch_size * patch_size)
    positions = torch.full((len(grids), longest, 2), -1, dtype=torch.long)
    for i, (rows, cols) in enumerate(grids):
        height, width = rows * k, cols * k
        y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        positions[i, : patches[i]] = torch.stack([x.flatten(), y.flatten()], dim=-1)
        values[i, : patches[i]] = torch.rand(patches[i], values.shape[-1], generator=generator)
    return {"pixel_values": values, "image_position_ids": positions}


def gemma4_prompt(prefix: Sequence[int], image_tokens: Sequence[int], suffix: Sequence[int]) -> list[int]:
    """Token ids of a prompt: <bos>, `prefix`, each image as <|image> its `image_tokens[i]` image tokens
    <image|>, then `suffix` (text token ids)."""
    ids = [BOS_TOKEN, *prefix]
    for count in image_tokens:
        ids += [BOI_TOKEN, *([IMAGE_TOKEN] * count), EOI_TOKEN]
    return ids + list(suffix)


def build_gemma4_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` with Gemma 4's special tokens (`GEMMA4_SPECIAL_TOKENS`, fixed
    ids), matched whole before normalisation. The chat template writes <bos>; padding is on the left."""
    specials = GEMMA4_SPECIAL_TOKENS
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
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = GEMMA4_CHAT_TEMPLATE
    return tokenizer


@functools.cache  # one class, so that an `AutoProcessor` registration matches the instances' class
def image_only_processor_class() -> type:
    """`Gemma4Processor` without its audio feature extractor and video processor (the video processor needs
    torchvision, not installable beside this CPU torch build).

    transformers lists a processor's parts from its `__init__` signature: this class's has only the image
    processor and the tokenizer, so it saves and loads those two (with `AutoProcessor` where it is
    registered: `AutoProcessor.register(Gemma4Config, <this class>)`). The real `__init__` runs; the parts it
    hands on as None are dropped before `ProcessorMixin` checks them (a class between the two in the MRO).
    Prompts and image outputs are the real class's. Built in a function: transformers 5.17's Gemma 4
    processor module imports torchvision itself."""
    from transformers import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    class _WithoutAbsentParts(ProcessorMixin):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            for part in ("feature_extractor", "video_processor"):
                if part in kwargs and kwargs[part] is None:
                    del kwargs[part]
            super().__init__(*args, **kwargs)

    class ImageOnlyGemma4Processor(Gemma4Processor, _WithoutAbsentParts):
        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            chat_template: Any = None,
            image_seq_length: int = 280,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                None, image_processor, tokenizer, None, chat_template, image_seq_length, **kwargs
            )

    return ImageOnlyGemma4Processor


def build_gemma4_processor(
    max_soft_tokens: int = 70,
    patch_size: int = 2,
    pooling_kernel_size: int = 2,
    words: Iterable[str] = DEFAULT_WORDS,
) -> Any:
    """Gemma 4's processor (`image_only_processor_class`): each image resized, keeping its aspect ratio, to
    at most `max_soft_tokens` soft tokens of `pooling_kernel_size`^2 patches each (Gemma 4's PIL
    preprocessing), each image placeholder expanded to `<|image>`, its soft tokens, `<image|>`."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    image_processor = Gemma4ImageProcessorPil(
        patch_size=patch_size, max_soft_tokens=max_soft_tokens, pooling_kernel_size=pooling_kernel_size
    )
    return image_only_processor_class()(
        image_processor=image_processor,
        tokenizer=build_gemma4_tokenizer(words),
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=max_soft_tokens,
    )


def build_tiny_gemma4_checkpoint(
    path: str | Path, seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **config: Any
) -> Path:
    """A random tiny Gemma 4 and its processor saved to `path`, ready for `AutoProcessor` /
    `AutoModelForImageTextToText.from_pretrained` (and so for `python src/run.py model.path=<path>`)."""
    processor = build_gemma4_processor(words=words)
    model = build_tiny_gemma4(seed=seed, vocab_size=len(processor.tokenizer), **config)
    model.generation_config.eos_token_id = [EOS_TOKEN, END_OF_TURN]
    return save_checkpoint(model, processor, Path(path))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pore.testing.tiny_gemma4 OUT_DIR [--seed N]`: write a tiny checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m pore.testing.tiny_gemma4", description="Write a tiny random Gemma 4 checkpoint."
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model and processor to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_gemma4_checkpoint(args.out_dir, seed=args.seed)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
