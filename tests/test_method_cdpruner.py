"""CDPruner: CLIP relevance to the instruction x similarity of the projected image tokens, greedy DPP MAP.

The greedy MAP is worked out by hand on a 3-token kernel; the kept set is checked against a plain per-image
loop of the official code (relevance from the vision tower's own features through a real tiny `CLIPModel`,
the official Cholesky updates) on LLaVA-1.5, in a padded batch and alone; keeping everything equals the
untouched model, and cached generation equals recomputing the shortened prompt by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from families import FAMILIES
from method_checks import batch_inputs
from pipeline_fixtures import run_program
from pore import Pruner, build_strategy
from pore.methods.cdpruner import greedy_dpp, text_embeddings
from pore.testing.tiny_clip import build_tiny_clip
from test_methods import kept_positions, staged_reference_logits

pytestmark = pytest.mark.transformers  # runs real families through the engine

TEXTS = ["what colour is the circle", "where is the square ? left or right", "how many"]
OPTIONS = {"text_encoder": "embedded"}


def test_greedy_dpp_map_by_hand() -> None:
    """L = [[1, .9, 0], [.9, 1, 0], [0, 0, .5]]: gains 1, 1, .5 -> token 0; c_0 = L_0 / 1 = (1, .9, 0),
    gains 0, .19, .5 -> token 2; c_1 = (L_2 - 0 c_0) / sqrt(.5) = (0, 0, .71), gains -, .19, 0 -> token 1.
    The near-duplicate of token 0 comes last although its own quality (1) is the largest left."""
    kernel = torch.tensor([[[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]]])
    member = torch.ones(1, 3, dtype=torch.bool)
    assert greedy_dpp(kernel, member, torch.tensor([3])).tolist() == [[0, 2, 1]]
    # Two images at once, one padded, budgets 2 and 1.
    other = torch.tensor([[[0.2, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.0]]])
    both = greedy_dpp(
        torch.cat([kernel, other]), torch.tensor([[True] * 3, [True, True, False]]), torch.tensor([2, 1])
    )
    assert both.tolist() == [[0, 2], [1, -1]]


def official_cdpruner(
    features: torch.Tensor, projected: torch.Tensor, text: str, keep: int, clip, tokenizer
) -> list[int]:
    """The official `encode_images` for one image: features (N, D_v), projected (N, D); kept, sorted."""
    image_embeds = clip.visual_projection(clip.vision_model.post_layernorm(features))
    text_embeds = text_embeddings(clip, tokenizer, text, features.device)
    image_normalized = projected / projected.norm(dim=-1, keepdim=True)
    similarity = image_normalized @ image_normalized.T
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(image_embeds @ text_embeds.T)).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    cis = torch.zeros(keep, len(features))
    gains = torch.diagonal(kernel).clone()
    picks = []
    for i in range(keep):
        j = int(torch.argmax(gains))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(gains[j])
        cis[i] = eis
        gains -= eis**2
        gains[j] = -float("inf")
    return sorted(picks)


def reference_kept(b: int, keep: int) -> list[list[int]]:
    family = FAMILIES["llava"]
    model = family.model("sdpa")
    inputs = family.sample(b)
    clip, tokenizer = build_tiny_clip(model.config.vision_config.hidden_size)
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        features = tower.hidden_states[model.config.vision_feature_layer][:, 1:]  # (I, N, D_v) patches
        projected = model.model.multi_modal_projector(features)  # (I, N, D)
        return [
            official_cdpruner(features[i], projected[i], TEXTS[b], keep, clip, tokenizer)
            for i in range(features.shape[0])
        ]


def test_kept_tokens_equal_the_official_loop_in_a_batch_and_alone() -> None:
    family = FAMILIES["llava"]
    model = family.model("sdpa")
    keep = 5
    expected = [reference_kept(b, keep) for b in range(len(family.images))]
    strategy = build_strategy("cdpruner", keep=keep, ratio=None, options=OPTIONS)
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        pruner.set_texts(TEXTS)
        model(**batch_inputs(family))
        assert pruner.last_record.kept_raster == expected
        for b in range(len(family.images)):
            pruner.set_texts([TEXTS[b]])
            model(**family.sample(b))
            assert pruner.last_record.kept_raster == [expected[b]]
        # Another instruction, other tokens: the choice is conditioned on the text.
        pruner.set_texts(["square"])
        model(**family.sample(0))
        assert pruner.last_record.kept_raster != [expected[0]]


def test_keeping_everything_equals_the_untouched_model() -> None:
    family = FAMILIES["llava"]
    model = family.model("sdpa")
    inputs = batch_inputs(family)
    strategy = build_strategy("cdpruner", keep=None, ratio=1.0, options=OPTIONS)
    with torch.no_grad():
        untouched = model(**inputs).logits
        with Pruner(model, strategy) as pruner:
            pruner.set_texts(TEXTS)
            pruned = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(pruned[real], untouched[real], atol=1e-5, rtol=0)


def test_cached_generation_equals_the_shortened_prompt() -> None:
    """Official positions: the kept sequence renumbered 0..L'-1, new tokens after it."""
    family = FAMILIES["llava"]
    model = family.model("sdpa")
    inputs = family.sample(0)
    input_ids, pixel_values = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad(), Pruner(model, build_strategy("cdpruner", keep=4, ratio=None, options=OPTIONS)) as p:
        p.set_texts([TEXTS[0]])
        cached = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, input_ids.shape[1] :]
    raster = p.last_record.kept_raster[0][0]
    assert raster == reference_kept(0, 4)[0]
    sequence, recomputed = input_ids, []
    for _ in range(5):
        kept = kept_positions(input_ids, raster) + list(range(input_ids.shape[1], sequence.shape[1]))
        logits = staged_reference_logits(model, sequence, pixel_values, [(0, kept, None)], compact=True)
        recomputed.append(int(logits[0, -1].argmax()))
        sequence = torch.cat([sequence, torch.tensor([[recomputed[-1]]])], dim=1)
    assert cached.tolist() == recomputed


def test_missing_text_encoder_text_or_support_is_one_clear_line() -> None:
    with pytest.raises(
        ValueError, match=r"cdpruner: needs the vision tower's CLIP text pair; set model\.text_encoder"
    ):
        build_strategy("cdpruner", options={"text_encoder": None}).resolve()
    with pytest.raises(ValueError, match="cdpruner: it ranks by similarity / diversity"):
        build_strategy("cdpruner", options=OPTIONS, prior={"name": "linear"}).resolve()
    family = FAMILIES["llava"]
    strategy = build_strategy("cdpruner", keep=3, ratio=None, options=OPTIONS)
    with (
        torch.no_grad(),
        Pruner(family.model("sdpa"), strategy),
        pytest.raises(ValueError, match=r"call pruner\.set_texts"),
    ):
        family.model("sdpa")(**family.sample(0))
    # LLaVA-NeXT: the official per-view rule is not implemented (refused when the prompt arrives).
    family = FAMILIES["llava_next"]
    with (
        pytest.raises(NotImplementedError, match="several views"),
        torch.no_grad(),
        Pruner(family.model("sdpa"), strategy, family.adapter) as pruner,
    ):
        pruner.set_texts(["x"] * len(family.images))
        if family.sizes is not None:
            pruner.set_image_sizes(family.sizes(None))
        family.model("sdpa")(**family.batch())
    # Qwen's ViT gives no vision-tower features per token: refused when the strategy meets the family.
    with pytest.raises(ValueError, match=r"cdpruner scores with the vision tower's .* qwen2_vl models do"):
        Pruner(FAMILIES["qwen2_vl"].model("sdpa"), strategy)


def test_run_on_the_embedded_model_keeps_16_tokens_per_image(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("strategy=cdpruner", "strategy.keep=16", "data.limit=4", "logger=none", "figures.enabled=false")
    result = run_program(*args, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert all(row["error"] is None and len(row["kept_visual_indices"]) == 16 for row in rows)
