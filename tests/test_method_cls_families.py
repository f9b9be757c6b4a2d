"""The [CLS]-attention methods (VisionZip, VisPruner, PruMerge) on the other families: LLaVA-NeXT runs the
rule in each view (base image, tiles) with its equal share of the image's budget; Qwen2-VL, whose vision
tower has no [CLS] token, refuses them in one line."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llava, make_prompt, pixels
from next_reference import SIDE, build_model, prompt_inputs
from pore import Pruner, build_strategy
from pore.adapters.llava_next import NEWLINE, LlavaNextAdapter
from qwen_reference import FAMILIES as QWEN_FAMILIES
from qwen_reference import sample_inputs, tiny_model
from test_adapter_llava_next import round_robin_quotas
from test_method_vispruner import official_reference as vispruner_reference
from vision_reference import ranked

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PRESETS = ["visionzip", "vispruner", "prumerge_plus"]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_families_without_a_cls_token_refuse_them(family: str, preset: str) -> None:
    with (
        pytest.raises(ValueError, match="qwen2_vl models do not give"),
        torch.no_grad(),
        Pruner(tiny_model(family), build_strategy(preset, keep=3)),
    ):
        tiny_model(family)(**sample_inputs(family, 0))


def next_views(model, inputs: dict, b: int):
    """Sample b's tokens as (view, row, col) in sequence order (newlines left out), and the eager feature
    layer's [CLS] rows (views, S * S) and outputs (views, S * S, D_v) of its views."""
    height, width = inputs["image_sizes"][b].tolist()
    coordinates = LlavaNextAdapter(model)._packed_coordinates(
        height, width, "default"
    )  # part, tile, row, col
    views = int(coordinates[:, 1].max()) + 2  # base + tiles
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            out = model.model.vision_tower(
                inputs["pixel_values"][b, :views], output_attentions=True, output_hidden_states=True
            )
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    layer = len(model.model.vision_tower.encoder.layers) + model.config.vision_feature_layer
    tokens = [(tile + 1, row, col) for part, tile, row, col in coordinates.tolist() if part != NEWLINE]
    return tokens, out.attentions[layer][:, :, 0, 1:].mean(dim=1), out.hidden_states[layer + 1][:, 1:]


@pytest.mark.parametrize("preset", ["vispruner", "visionzip"])
def test_llava_next_runs_the_rule_in_each_view(preset: str) -> None:
    """The image's budget split equally between its views; in each view, VisPruner's important + diverse
    tokens (re-stated by hand) or VisionZip's dominant tokens + contextual targets (no contextual token
    here: a view's share is below 64 / 10, so its split is all dominant)."""
    model = build_model()
    inputs = prompt_inputs([[(48, 30)], [(30, 45)]])
    keep = 8
    with torch.no_grad(), Pruner(model, build_strategy(preset, keep=keep)) as pruner:
        model(**inputs)
    for b in range(2):
        tokens, cls_rows, features = next_views(model, inputs, b)
        views = sorted({view for view, _, _ in tokens})
        members = [[i for i, token in enumerate(tokens) if token[0] == v] for v in views]
        quotas = round_robin_quotas(keep, [len(m) for m in members])
        expected = []
        for view, group, quota in zip(views, members, quotas, strict=True):
            patches = [tokens[i][1] * SIDE + tokens[i][2] for i in group]
            scores = cls_rows[view, patches]
            if preset == "vispruner":
                chosen = vispruner_reference(scores, features[view, patches], quota, 0.5)
            else:
                chosen = ranked(scores)[:quota]
            expected += [group[i] for i in chosen]
        assert len(views) > 2 and pruner.last_record.kept_raster[b] == [sorted(expected)]


ATTENTION_ONLY = {  # options that leave only the [CLS]-attention ranking, where suppression acts
    "visionzip": {"contextual": 0},
    "vispruner": {"important_ratio": 1.0},
    "prumerge_plus": {"adaptive": False, "merge": False},
}


@pytest.mark.parametrize("preset", PRESETS)
def test_padding_suppression_keeps_the_ranking_off_the_padding(preset: str) -> None:
    """PoRe's suppression half: a 200 x 300 image padded to a square has one padding row above and one below
    in the 6 x 6 grid (tests/test_pore_presets.py: the declared size says which tokens are padding); with
    suppression the attention-ranked tokens avoid them, without it the attention ranks some of them in."""
    model = build_tiny_llava()
    content = {r * 6 + c for r in range(1, 5) for c in range(6)}
    kept = {}
    for suppress in (False, True):
        strategy = build_strategy(
            preset, keep=12, options=ATTENTION_ONLY[preset], prior={"suppress_padding": suppress}
        )
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            pruner.set_image_sizes([[(200, 300)]])
            model(input_ids=torch.tensor([make_prompt([1, 5], 1, [7, 8])]), pixel_values=pixels(1, seed=3))
        kept[suppress] = set(pruner.last_record.kept_raster[0][0])
    assert len(kept[True]) == 12 and kept[True] <= content
    assert kept[False] - content  # the case is not trivial: unsuppressed, padding tokens are ranked in
