"""DivPrune: greedy max-min cosine diversity of the projected image tokens, before the language model.

The kept set is checked against the official rule worked out by hand on a small case, and against a plain
loop of the official rule over the language model's input embeddings, which a hook on the untouched model's
language model observes, on every family (the engine's contract tests cover keep-all, padded batch and
cached generation through `tests/test_contract.py`'s method table).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from families import FAMILIES
from method_checks import assert_cached_generation_equals_recomputing, language_model_inputs, token_positions
from pipeline_fixtures import run_program
from pore import Pruner, build_strategy
from pore.methods.divprune import cosine_distances, max_min_diverse
from test_methods import kept_positions, staged_reference_logits

pytestmark = pytest.mark.transformers  # runs real families through the engine


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_greedy_max_min_diversity_by_hand() -> None:
    """Tokens at 0, 10, 90, 180 and 45 degrees; cosine distance 1 - cos(angle between them).

    First pick: the farthest nearest neighbour: 180 (its nearest, 90, is at 1 - cos 90 = 1; the others' are
    0.015, 0.015, 0.29, 0.18). Then the largest distance to the picks: 0 (2 from 180), then 90
    (min(1, 1) = 1 > 45's min(1.71, 0.29) and 10's 0.015), then 45 (0.29 > 0.015), then 10."""
    features = torch.tensor([[unit(0), unit(10), unit(90), unit(180), unit(45)]])  # (1, 5, 2)
    member = torch.ones(1, 5, dtype=torch.bool)
    order = max_min_diverse(cosine_distances(features), member, torch.tensor([5]))
    assert order.tolist() == [[3, 0, 2, 4, 1]]
    assert max_min_diverse(cosine_distances(features), member, torch.tensor([3])).tolist() == [[3, 0, 2]]


def test_images_of_a_batch_with_different_sizes_and_budgets_run_at_once() -> None:
    """The same image alone and padded next to a larger one, with another budget: the same picks."""
    features = torch.tensor([[unit(0), unit(10), unit(90), unit(180), unit(45), unit(0)]])
    small = torch.tensor([[unit(0), unit(170), unit(60), [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    member = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    order = max_min_diverse(cosine_distances(torch.cat([features, small])), member, torch.tensor([4, 2]))
    assert order[0].tolist() == [3, 0, 2, 4]  # the duplicate of token 0 (slot 5) is never better
    # Nearest neighbours: 0 -> 60 (1 - cos 60 = 0.5), 170 -> 60 (1 - cos 110 = 1.34), 60 -> 0 (0.5): first
    # 170, then the farthest from it, 0 (1 - cos 170 = 1.98 > 1.34).
    assert order[1].tolist() == [1, 0, -1, -1]


def official_divprune(features: torch.Tensor, keep: int) -> list[int]:
    """The official loop (vbdi/divprune, `DivPrune` in llava_arch.py), one image, sorted kept indices."""
    unit_rows = features.double() / features.double().norm(dim=1, keepdim=True)
    distance = 1.0 - unit_rows @ unit_rows.T
    picks: list[int] = []
    for i in range(keep):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(distance[picks], dim=0).values
            scores[picks] = -1.0  # the official code relies on a pick's ~0 distance to itself
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kept_tokens_equal_the_official_loop_on_every_family(name: str) -> None:
    family = FAMILIES[name]
    model = family.model("sdpa")
    keep = family.keep
    strategy = build_strategy("divprune", keep=keep, ratio=None)
    expected = []
    for b in range(len(family.images)):
        embeds = language_model_inputs(family, model, b)
        per_image = []
        for image in range(len(family.prunable(b))):
            positions = token_positions(family, b, image)
            per_image.append(official_divprune(embeds[positions], keep))
        expected.append(per_image)
    with torch.no_grad(), Pruner(model, strategy, family.adapter) as pruner:
        if family.generate_sizes is not None:
            pruner.set_image_sizes(family.generate_sizes(None))
        model(**family.batch())
        assert pruner.last_record.kept_raster == expected
        for b in range(len(family.images)):
            if family.generate_sizes is not None:
                pruner.set_image_sizes(family.generate_sizes(b))
            model(**family.sample(b))
            assert pruner.last_record.kept_raster == [expected[b]]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_generation_equals_recomputing_by_hand(name: str) -> None:
    """Original positions on every family (the by-hand references keep them)."""
    family = FAMILIES[name]
    strategy = build_strategy("divprune", keep=family.keep, ratio=None, positions="original")
    assert_cached_generation_equals_recomputing(family, strategy, layer=0)


def test_compact_cached_generation_equals_the_shortened_prompt() -> None:
    """The official positions (LLaVA-1.5): the kept sequence renumbered 0..L'-1, new tokens after it."""
    model = FAMILIES["llava"].model("sdpa")
    inputs = FAMILIES["llava"].sample(0)
    input_ids, pixel_values = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad(), Pruner(model, build_strategy("divprune", keep=4, ratio=None)) as pruner:
        cached = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, input_ids.shape[1] :]
    raster = pruner.last_record.kept_raster[0][0]
    sequence, recomputed = input_ids, []
    for _ in range(5):
        kept = kept_positions(input_ids, raster) + list(range(input_ids.shape[1], sequence.shape[1]))
        logits = staged_reference_logits(model, sequence, pixel_values, [(0, kept, None)], compact=True)
        recomputed.append(int(logits[0, -1].argmax()))
        sequence = torch.cat([sequence, torch.tensor([[recomputed[-1]]])], dim=1)
    assert cached.tolist() == recomputed


def test_a_prior_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="divprune: it ranks by similarity / diversity"):
        build_strategy("divprune", prior={"name": "linear"}).resolve()
    with pytest.raises(ValueError, match="suppress_padding=false"):
        build_strategy("divprune", prior={"name": "none", "suppress_padding": True}).resolve()


def test_run_on_the_embedded_model_keeps_16_tokens_per_image(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("strategy=divprune", "strategy.keep=16", "data.limit=4", "logger=none", "figures.enabled=false")
    result = run_program(*args, f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert row["error"] is None
        assert len(row["kept_visual_indices"]) == 16 == row["n_visual_tokens"]
