"""A tiny CLIP pair (a real `CLIPModel` and a word-level tokenizer): CDPruner's text side in tests and on
the embedded model, which has no CLIP text tower of its own.

Built deterministically from a seed: random weights, so the relevance it gives is a fixed pseudo-random
function of the text and the image features, not a trained one. The vision side only has to match the
vision tower's hidden size: CDPruner uses its `post_layernorm` and `visual_projection` on the LLaVA vision
tower's features.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, processors
from tokenizers.models import WordLevel
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from pore.testing.tiny_llava import (
    BOS_TOKEN,
    DEFAULT_WORDS,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    _normalizer,
    _pre_tokenizer,
    vocabulary,
)

TEXT_POSITIONS = 16  # the text tower's max_position_embeddings: longer texts are cut into segments


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """Word-level, `<s> text </s>` like CLIP's start / end of text."""
    vocab = {token: index for index, token in enumerate(vocabulary(words))}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=TEXT_POSITIONS,
    )


def build_tiny_clip(vision_hidden: int, seed: int = 0) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """A `CLIPModel` whose vision side takes `vision_hidden` features, and its tokenizer."""
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": TEXT_POSITIONS,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    return model, tokenizer
