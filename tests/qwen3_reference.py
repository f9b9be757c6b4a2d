"""Tiny Qwen3-VL / Qwen3-VL-MoE inputs and independent references for the contract and adapter tests.

Nothing here uses the pruning engine. The kept set comes from eager attention with `output_attentions=True`
and image boundaries read off `image_grid_thw` by hand (`qwen_reference.reference_kept_raster`, which is
written for any Qwen grid). The pruned forward runs the decoder layers one by one: the image features and
the DeepStack features from the model's own `get_image_features`, the 3-D M-RoPE positions from its own
`get_rope_index`, the dropped tokens removed by plain indexing from decoder layer K on, and after each
DeepStack layer i the i-th features added to the visual tokens still there (so the dropped tokens' DeepStack
features go nowhere).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers.masking_utils import create_causal_mask

import qwen_reference
from pore.testing.tiny_qwen3_vl import PIXELS_PER_TOKEN, build_qwen3_vl_processor, build_tiny_qwen3_vl

FAMILIES = ("qwen3_vl", "qwen3_vl_moe")

# (question, image sizes (height, width)): different prompt lengths, grid shapes and numbers of images.
# Grids in tokens (16 x 16 pixels each): 64 x 64 -> 4 x 4, 48 x 80 -> 3 x 5, 64 x 32 -> 4 x 2,
# 80 x 48 -> 5 x 3.
SAMPLES: list[tuple[str, list[tuple[int, int]]]] = [
    ("what colour is the circle?", [(64, 64)]),
    ("is there a red square in the top left corner of the image?", [(48, 80), (64, 32)]),
    ("how many shapes?", [(80, 48)]),
]


@functools.cache
def processor():
    # The image-only variant, so the tests do not depend on whether torchvision is installed.
    return build_qwen3_vl_processor(images_only=True)


@functools.cache
def tiny_model(family: str, attn: str = "sdpa"):
    """One model per setting for the whole session: every test detaches its pruner (context manager)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    vocab = len(processor().tokenizer)
    return build_tiny_qwen3_vl(vocab, moe=family == "qwen3_vl_moe", attn_implementation=attn)


def prompt(question: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor().apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def make_inputs(samples: Sequence[tuple[str, list[tuple[int, int]]]] = SAMPLES, seed: int = 0) -> dict:
    """The processor's output for `samples` (left-padded batch): input_ids, attention_mask,
    mm_token_type_ids, pixel_values, image_grid_thw. Image pixels depend on (seed, sample, image)."""
    images = [
        [qwen_reference.image(size, seed=1000 * seed + 10 * b + i) for i, size in enumerate(sizes)]
        for b, (_, sizes) in enumerate(samples)
    ]
    texts = [prompt(question, len(sizes)) for question, sizes in samples]
    return dict(processor()(images=images, text=texts, padding=True, return_tensors="pt"))


def sample_inputs(index: int, seed: int = 0) -> dict:
    """SAMPLES[index] alone, with the same pixels it has inside a batch built with the same seed."""
    question, sizes = SAMPLES[index]
    images = [qwen_reference.image(size, seed=1000 * seed + 10 * index + i) for i, size in enumerate(sizes)]
    return dict(processor()(images=[images], text=[prompt(question, len(sizes))], return_tensors="pt"))


def prunable(index: int) -> list[int]:
    return [(h // PIXELS_PER_TOKEN) * (w // PIXELS_PER_TOKEN) for h, w in SAMPLES[index][1]]


def _mask(config, hidden: torch.Tensor):
    return create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=None
    )


def reference_pruned_logits(
    model, inputs: dict, layer: int, kept: torch.Tensor, with_deepstack: bool = True
) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose tokens outside `kept` are removed by hand from decoder
    layer `layer` on, with their DeepStack features; kept tokens keep their original 3-D M-RoPE positions.
    `with_deepstack=False` leaves the DeepStack features out (to show that a test would see them missing)."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1
    base, config = model.model, model.config
    language_model = base.language_model
    with torch.no_grad():
        hidden = base.get_input_embeddings()(input_ids)  # (1, L, D)
        vision = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        visual = input_ids[0] == config.image_token_id  # (L,) the image tokens, which get DeepStack
        hidden[0, visual] = torch.cat(list(vision.pooler_output)).to(hidden.dtype)
        # (M, D) per DeepStack layer: transformers >= 5.23 splits each layer's features per image
        deepstack = [
            layer_features if torch.is_tensor(layer_features) else torch.cat(list(layer_features))
            for layer_features in vision.deepstack_features
        ]
        row = torch.cumsum(visual.long(), 0) - 1  # (L,) feature row of each image token
        positions, _ = base.get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )  # (3, 1, L)
        cos, sin = language_model.rotary_emb(hidden, positions)  # (1, L, head_dim) each
        mask = _mask(language_model.config, hidden)
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
                visual, row = visual[kept], row[kept]
                mask = _mask(language_model.config, hidden)
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None
            )
            if with_deepstack and index < len(deepstack):
                hidden = hidden.clone()
                hidden[0, visual] = hidden[0, visual] + deepstack[index][row[visual]].to(hidden.dtype)
        return model.lm_head(language_model.norm(hidden))
