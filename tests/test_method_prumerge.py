"""PruMerge+ / PruMerge: the official rule by hand, then in the real tiny LLaVA against a plain re-statement.

Padded batch = single samples (adaptive, merged) and keep-all (`adaptive: false, merge: false`), on every
family with a [CLS] token, are in tests/test_contract.py's method table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import IMAGE_TOKEN, make_prompt, pixels
from families import llava_model
from pipeline_fixtures import run_program
from pore import Pruner, build_strategy
from pore.methods.prumerge import PruMerge, merge_weights, prumerge_select
from test_methods import kept_positions, single, staged_reference_logits
from vision_reference import ranked

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends


def test_the_official_choice_by_hand() -> None:
    """12 scores; sorted 1 1.5 2 2.5 3 3.5 4 5 6 7 90 100: Q1 (place 2.75) = 2.375, Q3 (place 8.25) = 6.25,
    fence 6.25 + 1.5 x 3.875 = 12.0625: outliers 100 (token 1) and 90 (token 8), ratio 2 / 12, int(12 x
    ratio) = 2 kept. PruMerge+: step_length int(6) = 6, every int(6 / 3) = 2nd token of 0..10 added."""
    scores = torch.tensor([[3, 100, 1, 7, 2, 6, 4, 5, 90, 2.5, 3.5, 1.5]])
    assert prumerge_select(scores, plus=False)[0].nonzero().flatten().tolist() == [1, 8]
    assert prumerge_select(scores, plus=True)[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 8, 10]
    flat = torch.ones(1, 12)  # no outlier: the top token (the official code divides by zero)
    assert prumerge_select(flat, plus=False)[0].nonzero().flatten().tolist() == [0]


def test_merge_weights_by_hand() -> None:
    """4 tokens, 2 neighbours each; keys (1, 0) (1, 0.1) (0, 1) (-1, 0.1). Cosines: 0-1 0.995, 0-2 0,
    0-3 -0.995, 1-2 0.0995, 1-3 -0.980, 2-3 0.0995. Nearest others: 0: 1 2; 1: 0 2; 2: 1 3; 3: 2 1. Each
    row holds those neighbours' attention."""
    keys = torch.tensor([[[1, 0], [1, 0.1], [0, 1], [-1, 0.1]]], dtype=torch.float)
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    weights = merge_weights(keys, attention, neighbours=2)[0]
    expected = [[0, 0.2, 0.3, 0], [0.1, 0, 0.3, 0], [0, 0.2, 0, 0.4], [0, 0.2, 0.3, 0]]
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"prumerge: unknown options\.variant 'pluss'; valid values: plus"):
        PruMerge(variant="pluss")
    with pytest.raises(ValueError, match=r"prumerge: options\.adaptive must be true or false"):
        PruMerge(adaptive="yes")
    with pytest.raises(ValueError, match=r"prumerge: it ranks by the vision tower's \[CLS\] attention"):
        build_strategy("prumerge_plus", prior={"name": "linear"}).resolve()


def official_vision(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As the official code: hooks on the last encoder layer's q_proj / k_proj, attention = softmax(q k^T /
    sqrt(C)) with the heads as one; -> the [CLS] row to the patches (P,), the patches' keys (P, C)."""
    layer, captured = model.model.vision_tower.encoder.layers[-1], {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    try:
        with torch.no_grad():
            model.model.vision_tower(pixel_values, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    q, k = captured["q"][0], captured["k"][0]  # (1 + P, C)
    attention = torch.softmax(q @ k.T * q.shape[-1] ** -0.5, dim=-1)
    return attention[0, 1:], k[1:]


def official_choice(cls_row: torch.Tensor, plus: bool) -> list[int]:
    values = cls_row.float().numpy()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    n = len(values)
    kept = ranked(cls_row)[: int(n * ratio)]
    if plus:
        kept += [x for x in range(0, n - 1, int(int(1 / ratio) / 3)) if x not in kept]
    return kept


def official_merge(embeddings: torch.Tensor, cls_row: torch.Tensor, keys: torch.Tensor, kept: list[int]):
    """The official per-token loop on one image's embeddings (P, D): (merged kept tokens, extra token)."""
    unit = keys / keys.norm(dim=-1, keepdim=True)
    merged = {}
    for i in kept:
        others = [j for j in range(len(cls_row)) if j != i]
        similarity = torch.stack([unit[i] @ unit[j] for j in others])
        nearest = [others[j] for j in similarity.topk(min(32, len(others))).indices.tolist()]
        merged[i] = embeddings[i] + sum(cls_row[j] * embeddings[j] for j in nearest)
    dropped = [j for j in range(len(cls_row)) if j not in kept]
    return merged, sum(cls_row[j] * embeddings[j] for j in dropped)


def merge_transform(input_ids: torch.Tensor, cls_row: torch.Tensor, keys: torch.Tensor, chosen: list[int]):
    """Hidden states (1, L, D) -> the kept tokens merged, the extra token in the first dropped slot."""
    slots = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten()
    extra_slot = min(set(range(len(slots))) - set(chosen))

    def transform(hidden: torch.Tensor) -> torch.Tensor:
        merged, extra = official_merge(hidden[0, slots], cls_row, keys, chosen)
        hidden = hidden.clone()
        for i, state in merged.items():
            hidden[0, slots[i]] = state
        hidden[0, slots[extra_slot]] = extra
        return hidden

    return transform


@pytest.mark.parametrize("variant", ["plus", "prumerge"])
def test_kept_tokens_and_logits_equal_the_official_rule(variant: str) -> None:
    """The joint-head [CLS] attention and keys of the last encoder layer as the official hooks compute them;
    the pruned forward equals the prompt with the kept embeddings merged, the extra token in the first
    dropped slot, the rest removed and the positions renumbered."""
    model = llava_model()
    input_ids, pixel_values = single(make_prompt([1, 5, 6], 1, [7, 8, 9, 10])), pixels(1, seed=5)
    strategy = build_strategy("prumerge_plus", options={"variant": variant})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    cls_row, keys = official_vision(model, pixel_values)
    chosen = official_choice(cls_row, plus=variant == "plus")
    extra_slot = min(set(range(36)) - set(chosen))
    kept = sorted([*chosen, extra_slot])
    assert pruner.last_record.kept_raster == [[kept]]
    stages = [(0, kept_positions(input_ids, kept), merge_transform(input_ids, cls_row, keys, chosen))]
    reference = staged_reference_logits(model, input_ids, pixel_values, stages, compact=True)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_fixed_budget_keeps_the_strategy_budget_with_the_extra_token() -> None:
    model = llava_model()
    input_ids, pixel_values = single(make_prompt([1, 5], 1, [7])), pixels(1, seed=7)
    strategy = build_strategy("prumerge_plus", keep=10, options={"adaptive": False})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        model(input_ids=input_ids, pixel_values=pixel_values)
    cls_row, _ = official_vision(model, pixel_values)
    top = ranked(cls_row)[:9]
    extra = min(set(range(36)) - set(top))
    assert pruner.last_record.kept_raster == [[sorted([*top, extra])]]


def test_cached_generation_equals_recomputing() -> None:
    """Greedy generation with the KV cache equals a loop that recomputes the merged, pruned sequence."""
    model = llava_model()
    input_ids, pixel_values = single(make_prompt([1, 11], 1, [12, 13, 14])), pixels(1, seed=6)
    length, new_tokens = input_ids.shape[1], 5
    with torch.no_grad(), Pruner(model, build_strategy("prumerge_plus")) as pruner:
        cached = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
        )[0, length:].tolist()
    cls_row, keys = official_vision(model, pixel_values)
    chosen = official_choice(cls_row, plus=True)
    kept = sorted([*chosen, min(set(range(36)) - set(chosen))])
    assert pruner.last_record.kept_raster == [[kept]]
    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        stages = [(0, kept_positions(sequence, kept), merge_transform(sequence, cls_row, keys, chosen))]
        logits = staged_reference_logits(model, sequence, pixel_values, stages, compact=True)
        recomputed.append(int(logits[0, -1].argmax()))
        sequence = torch.cat([sequence, torch.tensor([[recomputed[-1]]])], dim=1)
    assert cached == recomputed


def test_run_on_the_embedded_model(tmp_path: Path) -> None:
    """The adaptive count is data-dependent (about 20 of 64); adaptive=false keeps strategy.keep."""
    for name, extra in (("adaptive", []), ("fixed", ["strategy.options.adaptive=false"])):
        result = run_program(
            "strategy=prumerge_plus",
            "strategy.keep=16",
            *extra,
            "logger=none",
            "data.limit=8",
            f"output_dir={tmp_path / name}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (metrics_file,) = (tmp_path / name).rglob("metrics.json")
        metrics = json.loads(metrics_file.read_text())
        assert metrics["spatial/samples"] == 8
        if name == "fixed":
            assert metrics["eff/visual_tokens"] == 16
        else:
            assert 2 <= metrics["eff/visual_tokens"] < 32  # outliers + additions + 1 of 64
