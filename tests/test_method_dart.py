"""DART: pivots by the L1 norm of layer K-1's keys, the rest by least cosine similarity to the pivots.

The kept set is checked against a plain loop of the official rule over what the untouched model computes
(layer K-1's keys from its KV cache, layer K's input from `output_hidden_states` through the final norm), on
every family; the pivots' visiting order and the official budget split are worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from families import FAMILIES, Family
from method_checks import assert_cached_generation_equals_recomputing, batch_inputs, token_positions
from pipeline_fixtures import run_program
from pore import Pruner, build_strategy
from pore.methods.dart import DART, pivot_order
from pore.methods.image_groups import ImageGroups

pytestmark = pytest.mark.transformers  # runs real families through the engine

LAYER = 2


def test_pivots_are_visited_in_the_order_of_a_python_set_of_their_positions() -> None:
    """CPython: a set of up to 4 small ints has 8 slots, an int goes to slot position % 8; iteration runs
    over the slots. 40 -> 0, 36 -> 4, 101 -> 5; 37 -> 5 is taken and 5 + 9 linear probes would pass the
    table's end, so it goes to (5 * 5 + 1 + (37 >> 5)) % 8 = 3: 40, 37, 36, 101. And 45 -> 5, 33 -> 1,
    70 -> 6: 33, 45, 70."""
    assert pivot_order([40, 36], [101, 37]) == [0, 3, 1, 2]
    assert pivot_order([45, 33], [70]) == [1, 0, 2]


def test_official_budget_split_by_hand() -> None:
    """576 tokens, budget 128, 4 + 4 pivots: 128 // 8 = 16 per pivot, 4 + 8 * 16 = 132 kept (official);
    `exact`: 128 - 4 = 124 = 8 * 15 + 4, the first four pivots pick 16, the others 15."""
    groups = ImageGroups(
        sample=torch.tensor([0]),
        slots=torch.zeros(1, 576, dtype=torch.long),
        member=torch.ones(1, 576, dtype=torch.bool),
        budget=torch.tensor([128]),
    )
    count, pivots = torch.tensor([576]), torch.ones(1, 8, dtype=torch.bool)
    assert DART()._quotas(groups, count, pivots).tolist() == [[16] * 8]
    exact = DART(budget="exact")._quotas(groups, count, pivots)
    assert exact.tolist() == [[16] * 4 + [15] * 4] and int(exact.sum()) + 4 == 128


def official_dart(
    keys: torch.Tensor, states: torch.Tensor, image: list[int], text: list[int], budget: int, pivots: int
) -> list[int]:
    """The official loop for one image: keys (L, H_kv * d), final-normed states (L, D), the image's and the
    text's positions; returns the kept positions (sorted)."""
    norms = keys.abs().sum(-1)
    image_pivots = [image[i] for i in norms[image].topk(pivots).indices.tolist()]
    text_pivots = [text[i] for i in norms[text].topk(min(pivots, len(text))).indices.tolist()]
    per_pivot = min(budget, len(image) - pivots) // (2 * pivots)
    kept = set(image_pivots + text_pivots)
    free = [p for p in image if p not in image_pivots]
    for pivot in list(set(image_pivots + text_pivots)):
        similarity = torch.nn.functional.cosine_similarity(states[pivot][None], states[free], dim=-1)
        chosen = [free[i] for i in (-similarity).topk(per_pivot).indices.tolist()]
        kept.update(chosen)
        free = [p for p in free if p not in chosen]
    return sorted(kept - set(text_pivots))


def reference_kept(family: Family, b: int, keep: int, pivots: int) -> list[list[int]]:
    """Per image of sample b alone, the official kept set as raster indices."""
    model = family.model("sdpa")
    inputs = family.sample(b)
    # Layer K's input as the layer receives it: `output_hidden_states` records each layer's output before
    # the features Qwen3-VL adds after its first layers (DeepStack), so read it with a pre-hook instead.
    received: list[torch.Tensor] = []
    language_model = model.model.language_model
    hook = language_model.layers[LAYER].register_forward_pre_hook(
        lambda module, args, kwargs: received.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        keys = out.past_key_values.layers[LAYER - 1].keys[0]  # (H_kv, L, d), after RoPE
        keys = keys.transpose(0, 1).flatten(1)  # (L, H_kv * d)
        states = language_model.norm(received[0][0])  # (L, D)
    hook.remove()
    visual = set((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0].tolist())
    length = inputs["input_ids"].shape[1]
    kept = []
    for image in range(family.images[b]):
        positions = token_positions(family, b, image)
        text = [p for p in range(max(positions) + 1, length) if p not in visual]  # the text after it
        chosen = official_dart(keys, states, positions, text, keep, pivots)
        kept.append(sorted(positions.index(p) for p in chosen))
    return kept


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kept_tokens_equal_the_official_loop_on_every_family(name: str) -> None:
    family = FAMILIES[name]
    model = family.model("sdpa")
    # 1 + 1 pivots, 2 tokens each (fewer where an image is smaller: Gemma 4's 2 x 2 grid keeps 4)
    smallest = min(n for b in range(len(family.images)) for n in family.prunable(b))
    keep, pivots = min(5, smallest), 1
    strategy = build_strategy(
        "dart", keep=keep, ratio=None, options={"image_pivots": pivots, "text_pivots": pivots}
    )
    expected = [reference_kept(family, b, keep, pivots) for b in range(len(family.images))]
    with torch.no_grad(), Pruner(model, strategy, family.adapter) as pruner:
        if family.generate_sizes is not None:
            pruner.set_image_sizes(family.generate_sizes(None))
        model(**batch_inputs(family))
        assert pruner.last_record.kept_raster == expected
        for b in range(len(family.images)):
            if family.generate_sizes is not None:
                pruner.set_image_sizes(family.generate_sizes(b))
            model(**family.sample(b))
            assert pruner.last_record.kept_raster == [expected[b]]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_generation_equals_recomputing_by_hand(name: str) -> None:
    family = FAMILIES[name]
    strategy = build_strategy("dart", keep=family.keep, ratio=None, options={"image_pivots": 1})
    assert_cached_generation_equals_recomputing(family, strategy, layer=LAYER)


def test_options_and_a_prior_are_checked_with_the_reason() -> None:
    with pytest.raises(ValueError, match="dart: it ranks by similarity / diversity"):
        build_strategy("dart", prior={"name": "exponential"}).resolve()
    with pytest.raises(ValueError, match=r"dart: unknown options\.pivot 'value_norm'; valid values: key"):
        DART(pivot="value_norm")
    with pytest.raises(ValueError, match=r"dart: unknown options\.budget"):
        DART(budget="some")


def test_run_on_the_embedded_model_keeps_the_documented_count(tmp_path: Path) -> None:
    """keep=16 with 4 + 4 pivots: 16 // 8 = 2 per pivot, 4 + 8 * 2 = 20 tokens (official); exact: 16."""
    for budget, kept in (("official", 20), ("exact", 16)):
        out = tmp_path / budget
        args = ("strategy=dart", "strategy.keep=16", f"strategy.options.budget={budget}", "data.limit=4")
        result = run_program(*args, "logger=none", "figures.enabled=false", f"output_dir={out}")
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 4
        assert all(len(row["kept_visual_indices"]) == kept == row["n_visual_tokens"] for row in rows)
