"""TokenCarve: attention + SVD points, 1.5x the budget, half a budget merged away, against a by-hand run.

The contract (tests/test_contract.py) runs it on every family: keeping everything, a padded batch against
each sample alone. Here: the kept set and the merged hidden states against the official rule written out
with Python loops over eager `output_attentions` / `output_hidden_states`, the pruned forward against the
by-hand pruned forward, cached generation against recomputing, small cases checked by hand, the options,
and the run on the embedded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import IMAGE_TOKEN, TOKENS_PER_IMAGE, make_prompt, pixels
from families import llava_model
from pipeline_fixtures import run_program
from pore import ModelFacts, Pruner, build_strategy
from pore.methods import METHODS
from pore.methods.tokencarve import descending_rank, spectral_values
from test_methods import staged_reference_logits

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PROMPT = make_prompt([1, 5, 6], 1, [7, 8, 9, 10])
LAYER = 2


def by_hand_carving(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, keep: int):
    """The official rule for one image, written out: (sorted kept raster ids, {raster id of an A token: the
    raster ids merged into it})."""
    with torch.no_grad():
        out = model(
            input_ids=input_ids, pixel_values=pixel_values, output_attentions=True, output_hidden_states=True
        )
    image = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten().tolist()
    n = len(image)
    attention = out.attentions[LAYER - 1][0].mean(dim=0)[-1, image].double()  # (n,) last row, AV
    states = out.hidden_states[LAYER][0, image].float()  # (n, D): what layer K receives
    u, s, _ = torch.linalg.svd(states)  # full matrices, as the official call (n <= D here)
    spectral = (u[:, : len(s)] @ torch.diag(s)).abs().sum(dim=1)  # (n,)
    points = [0.0] * n
    for values in (attention, spectral):
        ranking = sorted(range(n), key=lambda i: (-float(values[i]), i))
        for place, token in enumerate(ranking):
            points[token] += (n - place) * 0.5
    top = sorted(range(n), key=lambda i: (-points[i], i))[: keep * 3 // 2]
    set_a, set_b = top[: len(top) // 2], top[len(top) // 2 :]
    unit = torch.nn.functional.normalize(states, dim=-1)
    closest = {}
    for token in set_b:
        similarities = [float(unit[token] @ unit[a]) for a in set_a]
        best = max(similarities)
        closest[token] = (best, set_a[similarities.index(best)])
    merged = sorted(set_b, key=lambda t: (-closest[t][0], set_b.index(t)))[: keep // 2]
    groups = {a: [t for t in merged if closest[t][1] == a] for a in set_a}
    kept = sorted(set(set_a) | (set(set_b) - set(merged)))
    return kept, {a: group for a, group in groups.items() if group}


def merge_transform(input_ids: torch.Tensor, groups: dict[int, list[int]]):
    """The hidden states (1, L, D) with each A token replaced by the mean of itself and its group."""
    image = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten().tolist()

    def transform(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        for a, group in groups.items():
            members = [image[a]] + [image[t] for t in group]
            hidden[0, image[a]] = hidden[0, members].mean(dim=0)
        return hidden

    return transform


def kept_prompt_positions(input_ids: torch.Tensor, kept: list[int], length: int) -> list[int]:
    image = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten().tolist()
    dropped = {image[r] for r in range(TOKENS_PER_IMAGE) if r not in set(kept)}
    return [p for p in range(length) if p not in dropped]


@pytest.mark.parametrize("keep", [8, 13])
def test_kept_tokens_and_merged_states_equal_the_official_rule_by_hand(keep: int) -> None:
    model = llava_model("eager")
    input_ids, pixel_values = torch.tensor([PROMPT]), pixels(1, seed=2)
    kept, groups = by_hand_carving(model, input_ids, pixel_values, keep)
    assert len(kept) == keep and sum(map(len, groups.values())) == keep // 2
    with torch.no_grad(), Pruner(model, build_strategy("tokencarve", keep=keep, ratio=None)) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert pruner.strategy.positions == "compact"
    assert pruner.last_record.kept_raster == [[kept]]
    stages = [
        (LAYER, kept_prompt_positions(input_ids, kept, len(PROMPT)), merge_transform(input_ids, groups))
    ]
    reference = staged_reference_logits(model, input_ids, pixel_values, stages, compact=True)
    torch.testing.assert_close(logits[:, -1], reference[:, -1], atol=1e-5, rtol=0)


def test_cached_generation_equals_recomputing_without_cache() -> None:
    model = llava_model("eager")
    input_ids, pixel_values = torch.tensor([PROMPT]), pixels(1, seed=4)
    keep, new_tokens = 8, 5
    kept, groups = by_hand_carving(model, input_ids, pixel_values, keep)
    with torch.no_grad(), Pruner(model, build_strategy("tokencarve", keep=keep, ratio=None)) as pruner:
        cached = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
        )[0, input_ids.shape[1] :].tolist()
    assert pruner.last_record.kept_raster == [[kept]]
    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        positions = kept_prompt_positions(input_ids, kept, sequence.shape[1])
        stages = [(LAYER, positions, merge_transform(input_ids, groups))]
        logits = staged_reference_logits(model, sequence, pixel_values, stages, compact=True)
        token = int(logits[0, -1].argmax())
        recomputed.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert cached == recomputed


def test_points_and_spectral_values_of_cases_checked_by_hand() -> None:
    """AV [.1 .4 .3 .2] ranks 1, 2, 3, 0; SV [4 1 3 2] ranks 0, 2, 3, 1. Points (n - place) / 2 each:
    token 0: (1 + 4) / 2 = 2.5, token 1: (4 + 1) / 2 = 2.5, token 2: (3 + 3) / 2 = 3, token 3: 2.
    Rows [1 0], [2 0], [0 0]: one singular value sqrt(5), U's column [1 2 0] / sqrt(5): |U S| rows 1, 2, 0."""
    every = torch.ones(1, 4, dtype=torch.bool)
    attention = torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=torch.float64)
    spectral = torch.tensor([[4.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    assert descending_rank(attention, every).tolist() == [[3, 0, 1, 2]]
    points = (4 - descending_rank(attention, every)) * 0.5 + (4 - descending_rank(spectral, every)) * 0.5
    assert points.tolist() == [[2.5, 2.5, 3.0, 2.0]]
    # Only the tokens `among` are ranked; equal values go to the earlier token.
    among = torch.tensor([[True, False, True, True]])
    assert descending_rank(torch.tensor([[0.2, 0.9, 0.2, 0.5]]), among).tolist() == [[1, 3, 2, 0]]
    states = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    values = spectral_values(states, torch.ones(1, 3, dtype=torch.bool))
    assert values[0].tolist() == pytest.approx([1.0, 2.0, 0.0], abs=1e-6)
    # A row outside `among` is zeroed: it neither counts nor changes the others.
    masked = spectral_values(
        torch.tensor([[[1.0, 0.0], [2.0, 0.0], [9.0, 9.0]]]), torch.tensor([[1, 1, 0]]).bool()
    )
    assert masked[0].tolist() == pytest.approx([1.0, 2.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("options", [{"merge": False}, {"mode": "attention"}])
def test_options_keep_the_budget(options: dict) -> None:
    """merge=false: the top 8 by the points, nothing merged; mode=attention: the 12 best by attention alone,
    of which the 6 best (set A) always stay."""
    model = llava_model()
    input_ids, pixel_values = torch.tensor([PROMPT]), pixels(1, seed=2)
    strategy = build_strategy("tokencarve", keep=8, ratio=None, options=options)
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        model(input_ids=input_ids, pixel_values=pixel_values)
    record = pruner.last_record
    kept = record.kept_raster[0][0]
    assert len(kept) == 8
    attention = record.scores[0]  # (36,) AV, the score the engine ranks (no prior)
    by_attention = sorted(range(TOKENS_PER_IMAGE), key=lambda i: (-float(attention[i]), i))
    if options.get("mode") == "attention":
        assert set(by_attention[:6]) <= set(kept) and set(kept) <= set(by_attention[:12])


def test_bad_options_and_a_second_stage_are_refused() -> None:
    with pytest.raises(ValueError, match=r"tokencarve: unknown options\.mode 'svd'; valid values: fused"):
        METHODS.get("tokencarve")(mode="svd")
    with pytest.raises(ValueError, match=r"tokencarve: options\.av_weight must be a number in \[0, 1\]"):
        METHODS.get("tokencarve")(av_weight=2)
    with pytest.raises(ValueError, match=r"tokencarve: its rule has at most 1 pruning stages"):
        build_strategy("tokencarve", layer=[1, 2], ratio=[0.5, 0.25]).resolve()


def test_the_preset_is_the_official_default() -> None:
    strategy = build_strategy("tokencarve")
    assert (strategy.layer, strategy.stages()[0].budget(576)) == (2, 64)
    assert strategy.options == {"mode": "fused", "av_weight": 0.5, "merge": True}
    assert strategy.resolve(ModelFacts("llava", 32)).positions == "compact"


def test_the_run_on_the_embedded_model_keeps_16_tokens(tmp_path: Path) -> None:
    out = tmp_path / "tokencarve"
    result = run_program(
        "strategy=tokencarve",
        "strategy.keep=16",
        "data.limit=4",
        "data.batch_size=2",
        "logger=none",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert all(row["n_visual_tokens"] == 16 and len(row["kept_visual_indices"]) == 16 for row in rows)
