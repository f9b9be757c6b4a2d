"""VisPruner: the official rule by hand, then in the real tiny LLaVA against a plain re-statement of it.

Keep-all and padded batch = single samples, on every family with a [CLS] token, are in
tests/test_contract.py's method table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_prompt, pixels
from families import llava_model
from pipeline_fixtures import run_program
from pore import Pruner, build_strategy
from pore.methods.vispruner import VisPruner, vispruner_select
from test_methods import kept_positions, single, staged_reference_logits
from vision_reference import ranked, vision_reference

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends


def test_the_official_rule_by_hand() -> None:
    """8 tokens, budget 6, important int(6 x 0.34) = 2: tokens 0 (0.8) and 2 (0.7). The rest by attention:
    3 4 5 6 7 1 (R = 6, 4 diverse, so 2 removed). A = 3 5 7, B = 4 6 1; duplicate scores (largest cosine to
    B): 3 (1, 0.1) ~ 4 (1, 0): 0.995; 5 (0.2, 1) ~ 6 (0, 1): 0.981; 7 (1, -1): 0.707. Removed: 3 and 5.
    Kept: 0 2 + 7 4 6 1."""
    scores = torch.tensor([[0.8, 0.1, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    features = torch.tensor(
        [[[3, 3], [-1, 0], [2, 5], [1, 0.1], [1, 0], [0.2, 1], [0, 1], [1, -1]]], dtype=torch.float
    )
    chosen = vispruner_select(scores, features, budget=6, important_ratio=0.34)
    assert chosen[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 7]


def test_at_most_eight_duplicates_go_per_step() -> None:
    """40 candidates, 4 important + 28 diverse of 32: R = 36, 8 removed in one step, all from A (the even
    places of the attention order), so every odd place survives."""
    torch.manual_seed(0)
    scores = torch.linspace(1, 0, 40)[None]  # attention order = index order
    features = torch.randn(1, 40, 6)
    chosen = vispruner_select(scores, features, budget=32, important_ratio=0.125)[0]
    assert chosen[:4].all() and int(chosen.sum()) == 32
    residual = list(range(4, 40))
    assert all(chosen[i] for i in residual[1::2])  # B is never removed
    assert sum(not chosen[i] for i in residual[::2]) == 8


def test_bad_important_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vispruner: options\.important_ratio must be a number in \[0, 1\]"):
        VisPruner(important_ratio=1.5)
    with pytest.raises(ValueError, match=r"vispruner: it ranks by the vision tower's \[CLS\] attention"):
        build_strategy("vispruner", prior={"name": "exponential"}).resolve()


def official_reference(scores: torch.Tensor, features: torch.Tensor, budget: int, ratio: float) -> list[int]:
    """The official rule re-stated with Python lists on one image: the sorted kept indices."""
    important = int(budget * ratio)
    order = ranked(scores)
    residual, diverse = order[important:], budget - important
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0 and min(8, len(residual) - diverse) > 0:
        removed = min(8, len(residual) - diverse)
        a, b = residual[::2], residual[1::2]
        duplicate = {i: max(float(unit[i] @ unit[j]) for j in b) for i in a}
        survivors = sorted(a, key=lambda i: (-duplicate[i], a.index(i)))[removed:]
        residual = survivors + b
    return sorted(order[:important] + (residual if diverse > 0 else []))


@pytest.mark.parametrize(("keep", "ratio"), [(8, 0.5), (12, 0.75), (20, 0.5)])
def test_kept_tokens_and_logits_equal_the_official_rule(keep: int, ratio: float) -> None:
    """Important tokens by the eager [CLS] row, diverse ones by the feature layer's output; the pruned
    forward equals the prompt with the dropped tokens removed and renumbered (compact positions)."""
    model = llava_model()
    input_ids, pixel_values = single(make_prompt([1, 5, 6], 1, [7, 8, 9, 10])), pixels(1, seed=5)
    strategy = build_strategy("vispruner", keep=keep, options={"important_ratio": ratio})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    vision = vision_reference(model, pixel_values)
    kept = official_reference(vision.cls_attention[0], vision.features[0], keep, ratio)
    assert pruner.last_record.kept_raster == [[kept]]
    stages = [(0, kept_positions(input_ids, kept), None)]
    reference = staged_reference_logits(model, input_ids, pixel_values, stages, compact=True)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_cached_generation_equals_recomputing() -> None:
    model = llava_model()
    input_ids, pixel_values = single(make_prompt([1, 11], 1, [12, 13, 14])), pixels(1, seed=6)
    length, new_tokens = input_ids.shape[1], 5
    with torch.no_grad(), Pruner(model, build_strategy("vispruner", keep=8)) as pruner:
        cached = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
        )[0, length:].tolist()
    vision = vision_reference(model, pixel_values)
    kept = official_reference(vision.cls_attention[0], vision.features[0], 8, 0.5)
    assert pruner.last_record.kept_raster == [[kept]]
    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        stages = [(0, kept_positions(sequence, kept), None)]
        logits = staged_reference_logits(model, sequence, pixel_values, stages, compact=True)
        recomputed.append(int(logits[0, -1].argmax()))
        sequence = torch.cat([sequence, torch.tensor([[recomputed[-1]]])], dim=1)
    assert cached == recomputed


def test_run_keeps_16_tokens_on_the_embedded_model(tmp_path: Path) -> None:
    result = run_program(
        "strategy=vispruner", "strategy.keep=16", "logger=none", "data.limit=8", f"output_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["eff/visual_tokens"] == 16 and metrics["spatial/samples"] == 8
