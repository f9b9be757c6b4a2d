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


def _rows(features) -> torch.Tensor:
    """(M, D): one DeepStack layer's features, which transformers >= 5.23 splits per image (video)."""
    return features if torch.is_tensor(features) else torch.cat(list(features))


def reference_pruned_logits(
    model, inputs: dict, layer: int, kept: torch.Tensor, with_deepstack: bool = True
) -> torch.Tensor:
    """Logits (1, L', V) of one unpadded sample whose tokens outside `kept` are removed by hand from decoder
    layer `layer` on, with their DeepStack features; kept tokens keep their original 3-D M-RoPE positions.
    Images and videos: each kind's features from the model's own encoder, the DeepStack rows of both in
    sequence order (as the model joins them). `with_deepstack=False` leaves the DeepStack features out (to
    show that a test would see them missing)."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1
    base, config = model.model, model.config
    language_model = base.language_model
    with torch.no_grad():
        hidden = base.get_input_embeddings()(input_ids)  # (1, L, D)
        kinds = {  # placeholder mask (L,) -> the encoder's outputs for that kind
            "image": (input_ids[0] == config.image_token_id, "pixel_values", "image_grid_thw"),
            "video": (input_ids[0] == config.video_token_id, "pixel_values_videos", "video_grid_thw"),
        }
        visual = kinds["image"][0] | kinds["video"][0]  # (L,) the tokens that get DeepStack features
        deepstack: list[torch.Tensor] = []  # (M, D) per DeepStack layer, rows in sequence order
        for kind, (mask, pixels, grid) in kinds.items():
            if inputs.get(pixels) is None:
                continue
            encode = base.get_image_features if kind == "image" else base.get_video_features
            vision = encode(inputs[pixels], inputs[grid])
            hidden[0, mask] = torch.cat(list(vision.pooler_output)).to(hidden.dtype)
            for index, features in enumerate(vision.deepstack_features):
                if index == len(deepstack):
                    deepstack.append(hidden.new_zeros(int(visual.sum()), hidden.shape[-1]))
                deepstack[index][mask[visual]] = _rows(features).to(hidden.dtype)
        row = torch.cumsum(visual.long(), 0) - 1  # (L,) DeepStack row of each visual token
        positions, _ = base.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
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
                hidden[0, visual] = hidden[0, visual] + deepstack[index][row[visual]]
        return model.lm_head(language_model.norm(hidden))


# ------------------------------------------------------------------------------------------------- video

# Prompts with videos, as Qwen3VLProcessor writes them: every frame (temporal patch) its own run,
# `<t seconds>` <|vision_start|> <|video_pad|> x (h / 2)(w / 2) <|vision_end|>, the timestamp being text.
# Items: ("video", t, h, w) or ("image", h, w), in patches (8 px; 2 x 2 patches per token).
VIDEO_SAMPLES: list[tuple[list[int], list[tuple]]] = [
    ([41, 42], [("video", 2, 4, 6), ("image", 4, 4)]),  # frames of 2 x 3 tokens, then a 2 x 2 image
    ([43, 44, 45, 46], [("image", 4, 8), ("video", 3, 4, 4)]),  # a 2 x 4 image, then 3 frames of 2 x 2
]
TIMESTAMP = 30  # token id of the frames' timestamps (any text token: `<0.5 seconds>` is text)


def _video_sample(index: int, seed: int) -> tuple[list[int], list[list[int]], dict]:
    """(input ids, sequence positions of each item's tokens, pixels) of VIDEO_SAMPLES[index], unpadded."""
    config = tiny_model("qwen3_vl").config
    vision = config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    start, end = config.vision_start_token_id, config.vision_end_token_id
    question, items = VIDEO_SAMPLES[index]
    ids, spans = [1], []
    pixels: dict[str, list[torch.Tensor]] = {"image": [], "video": [], "image_grid": [], "video_grid": []}
    for i, item in enumerate(items):
        generator = torch.Generator().manual_seed(1000 * seed + 10 * index + i)
        kind, (t, h, w) = item[0], (item[1:] if item[0] == "video" else (1, *item[1:]))
        token = config.video_token_id if kind == "video" else config.image_token_id
        span = []
        for frame in range(t):
            ids += ([TIMESTAMP + frame] if kind == "video" else []) + [start]
            span += range(len(ids), len(ids) + h * w // 4)
            ids += [token] * (h * w // 4) + [end]
        spans.append(span)
        pixels[kind].append(torch.randn(t * h * w, patch, generator=generator))
        pixels[f"{kind}_grid"].append(torch.tensor([[t, h, w]]))
    return ids + question, spans, pixels


def video_inputs(indices: Sequence[int] = (0, 1), seed: int = 0) -> tuple[dict, list[list[list[int]]]]:
    """The model's inputs for VIDEO_SAMPLES[indices] (left-padded batch; pixels depend on (seed, sample,
    item) only, so a sample alone has the pixels it has in a batch) and, per sample, the sequence positions
    of each item's tokens (by construction, not read from the inputs)."""
    config = tiny_model("qwen3_vl").config
    samples = [_video_sample(index, seed) for index in indices]
    length = max(len(ids) for ids, _, _ in samples)
    pad = processor().tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids, _, _ in samples])
    spans = [[[p + length - len(ids) for p in span] for span in item] for ids, item, _ in samples]
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids, _, _ in samples])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == config.image_token_id).long()
        + 2 * (input_ids == config.video_token_id).long(),
    }
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if any(pixels[kind] for _, _, pixels in samples):
            inputs[key] = torch.cat([x for _, _, pixels in samples for x in pixels[kind]])
            inputs[f"{kind}_grid_thw"] = torch.cat(
                [x for _, _, pixels in samples for x in pixels[f"{kind}_grid"]]
            )
    return inputs, spans
