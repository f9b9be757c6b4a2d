"""VisionZip: the official rule by hand, then in the real tiny LLaVA against a plain re-statement of it.

Keep-all and padded batch = single samples, on every family with a [CLS] token, are in
tests/test_contract.py's method table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import IMAGE_TOKEN, make_prompt, pixels
from families import llava_model
from pipeline_fixtures import run_program
from pore import Pruner, build_strategy
from pore.methods.visionzip import VisionZip, visionzip_select
from test_methods import kept_positions, single, staged_reference_logits
from vision_reference import ranked, vision_reference

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends


def test_the_official_rule_by_hand() -> None:
    """8 tokens, 2 dominant + 2 contextual. Dominant: the two largest scores, tokens 1 (0.9) and 3 (0.8).
    Remaining in order: 0 2 4 5 6 7 (R = 6), step 6 // 2 = 3: targets 0 and 5. Merged: 2 4 6 7, each to the
    target of the largest cosine: 2 (1, 0.1) -> 0 (1, 0); 4 (0.2, 1) -> 5 (0, 1); 6 (1, 1.2) -> 5 (cos
    0.77 vs 0.64); 7 (3, -1) -> 0."""
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.05, 0.4, 0.15]])
    keys = torch.tensor(
        [[[1, 0], [5, 5], [1, 0.1], [-1, 2], [0.2, 1], [0, 1], [1, 1.2], [3, -1]]], dtype=torch.float
    )
    dominant, targets, merged, assignment = visionzip_select(scores, keys, dominant=2, contextual=2)
    assert dominant[0].nonzero().flatten().tolist() == [1, 3]
    assert targets.tolist() == [[0, 5]]
    assert merged.tolist() == [[2, 4, 6, 7]]
    assert assignment.tolist() == [[0, 1, 1, 0]]


def test_the_official_split_of_each_budget() -> None:
    assert [VisionZip().split(budget) for budget in (64, 128, 192, 16, 8)] == [
        (54, 10),
        (108, 20),
        (162, 30),
        (14, 2),
        (7, 1),
    ]
    assert VisionZip(contextual=3).split(8) == (5, 3)
    with pytest.raises(ValueError, match=r"options\.contextual must be null or an integer >= 0"):
        VisionZip(contextual=-1)


def test_a_prior_with_position_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"visionzip: it ranks by the vision tower's \[CLS\] attention"):
        build_strategy("visionzip", prior={"name": "linear"}).resolve()


def official_reference(scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """The official rule re-stated token by token on one image: (kept indices, {target: merged indices})."""
    dominant_set = set(ranked(scores)[:dominant])
    remaining = [i for i in range(len(scores)) if i not in dominant_set]
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    metric = keys / keys.norm(dim=-1, keepdim=True)
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for i in remaining:
        if i not in groups:
            groups[max(targets, key=lambda t: float(metric[i] @ metric[t]))].append(i)
    return sorted(dominant_set | set(targets)), groups


def merge_transform(input_ids: torch.Tensor, groups: dict[int, list[int]]):
    """Hidden states (1, L, D) -> each target's embedding plus the mean of its merged tokens' embeddings."""
    slots = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten()

    def transform(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        for target, members in groups.items():
            if members:
                hidden[0, slots[target]] += hidden[0, slots[members]].mean(dim=0)
        return hidden

    return transform


@pytest.mark.parametrize("keep", [8, 12])
def test_kept_tokens_and_logits_equal_the_official_rule(keep: int) -> None:
    """Dominant by the eager [CLS] row, contextual targets and their merges by the feature layer's keys;
    the pruned forward equals the prompt with the dropped tokens removed, the merged ones added into their
    targets' embeddings, renumbered (compact positions, the official code removes the tokens)."""
    model = llava_model()
    input_ids, pixel_values = single(make_prompt([1, 5, 6], 1, [7, 8, 9, 10])), pixels(1, seed=5)
    strategy = build_strategy("visionzip", keep=keep, options={"contextual": 3})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    vision = vision_reference(model, pixel_values)
    kept, groups = official_reference(vision.cls_attention[0], vision.keys[0].mean(dim=1), keep - 3, 3)
    assert pruner.last_record.kept_raster == [[kept]]
    assert sum(len(members) for members in groups.values()) == 36 - keep  # every dropped token merged
    reference = staged_reference_logits(
        model,
        input_ids,
        pixel_values,
        [(0, kept_positions(input_ids, kept), merge_transform(input_ids, groups))],
        compact=True,
    )
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_cached_generation_equals_recomputing() -> None:
    """Greedy generation with the KV cache equals a loop that recomputes the merged, pruned sequence."""
    model = llava_model()
    input_ids, pixel_values = single(make_prompt([1, 11], 1, [12, 13, 14])), pixels(1, seed=6)
    length, new_tokens = input_ids.shape[1], 5
    with torch.no_grad(), Pruner(model, build_strategy("visionzip", keep=8, options={"contextual": 2})) as p:
        cached = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
        )[0, length:].tolist()
    vision = vision_reference(model, pixel_values)
    kept, groups = official_reference(vision.cls_attention[0], vision.keys[0].mean(dim=1), 6, 2)
    assert p.last_record.kept_raster == [[kept]]
    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        stage = (0, kept_positions(sequence, kept), merge_transform(sequence, groups))
        logits = staged_reference_logits(model, sequence, pixel_values, [stage], compact=True)
        recomputed.append(int(logits[0, -1].argmax()))
        sequence = torch.cat([sequence, torch.tensor([[recomputed[-1]]])], dim=1)
    assert cached == recomputed


def test_run_keeps_16_tokens_on_the_embedded_model(tmp_path: Path) -> None:
    result = run_program(
        "strategy=visionzip", "strategy.keep=16", "logger=none", "data.limit=8", f"output_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["eff/visual_tokens"] == 16 and metrics["spatial/samples"] == 8
