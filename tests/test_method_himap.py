"""HiMAP: text-guided then image-guided pruning, against eager attention weights read by hand.

The contract (tests/test_contract.py) runs it on every family: keeping everything, a padded batch against
each sample alone. Here: the kept set of each stage against the official rule computed from eager
`output_attentions`, the pruned forward against the by-hand pruned forward, cached generation against
recomputing, a case small enough to check by hand, and the run on the embedded model.
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
from pore.adapters import VisualLayout
from pore.methods import METHODS, ScoringInputs
from pore.methods.himap import IMAGE_STAGE, TEXT_STAGE
from pore.methods.requests import ImageRows
from test_methods import staged_reference_logits, top_k

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

ONE_IMAGE = make_prompt([1, 5, 6], 1, [7, 8, 9, 10])
TWO_IMAGES = make_prompt([1, 11], 2, [12, 13, 14, 15, 16, 17])
LAYERS = [1, 3]
KEEP = [18, 9]  # ratios 0.5 / 0.25 of the 36 tokens of an image


def image_slots(sequence: list[int], image: int) -> list[int]:
    """Positions in `sequence` of the tokens of image `image` (consecutive runs of TOKENS_PER_IMAGE)."""
    slots = [i for i, token in enumerate(sequence) if token == IMAGE_TOKEN]
    return slots[image * TOKENS_PER_IMAGE : (image + 1) * TOKENS_PER_IMAGE]


def stage_rasters(record) -> list[list[list[int]]]:
    """Per stage, per image of the only sample: the kept raster ids."""
    layout = record.layout
    rasters = []
    for kept in record.stage_kept:
        chosen = (kept & layout.valid & layout.prunable)[0]
        images = layout.image_index[0]
        raster = layout.raster[0]
        rasters.append(
            [
                sorted(raster[chosen & (images == i)].tolist())
                for i in range(int(images[layout.valid[0]].max()) + 1)
            ]
        )
    return rasters


@pytest.mark.parametrize("prompt", [ONE_IMAGE, TWO_IMAGES], ids=["one_image", "two_images"])
def test_stages_rank_by_text_then_by_image_attention_as_the_official_code(prompt: list[int]) -> None:
    """Stage 1 (before layer 1): per image, the 18 tokens with the largest attention summed over the text
    rows after the image in layer 0. Stage 2 (before layer 3): the 9 of them with the largest attention summed
    over the rows of the image's remaining tokens in layer 2 of the stage-1 sequence. Original positions."""
    model = llava_model("eager")
    input_ids = torch.tensor([prompt])
    images = len([t for t in prompt if t == IMAGE_TOKEN]) // TOKENS_PER_IMAGE
    pixel_values = pixels(images, seed=1)
    strategy = build_strategy("himap", layer=LAYERS, ratio=[0.5, 0.25])
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    assert pruner.strategy.positions == "original"
    got = stage_rasters(pruner.last_record)

    # Stage 1, by hand: layer 0's attention of the untouched model, mean over heads.
    with torch.no_grad():
        attention = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True).attentions
    mean = attention[LAYERS[0] - 1][0].mean(dim=0).double()  # (L, L)
    first = []
    for image in range(images):
        slots = image_slots(prompt, image)
        text_after = [i for i, t in enumerate(prompt) if t != IMAGE_TOKEN and i > slots[-1]]
        img2txt = mean[text_after][:, slots].sum(dim=0)  # (36,)
        first.append(top_k(img2txt, KEEP[0]))
    assert got[0] == first

    # Stage 2, by hand: layer 2's attention over the sequence stage 1 left (a one-stage HiMAP run makes that
    # sequence: it keeps exactly `first`, checked above).
    with torch.no_grad(), Pruner(model, build_strategy("himap", layer=LAYERS[0], ratio=0.5)):
        shortened = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True).attentions
    mean = shortened[LAYERS[1] - 1][0].mean(dim=0).double()  # (L', L')
    survivors = [p for p in range(len(prompt)) if p not in dropped_positions(prompt, first)]
    second = []
    for image in range(images):
        slots = image_slots(prompt, image)
        rows = [survivors.index(slots[r]) for r in first[image]]  # the image's tokens in the new sequence
        img2img = mean[rows][:, rows].sum(dim=0)  # (18,)
        second.append([first[image][i] for i in top_k(img2img, KEEP[1])])
    assert got[1] == second
    assert pruner.last_record.kept_raster == [second]

    stages = [
        (LAYERS[0], [p for p in range(len(prompt)) if p not in dropped_positions(prompt, first)], None),
        (LAYERS[1], [p for p in range(len(prompt)) if p not in dropped_positions(prompt, second)], None),
    ]
    reference = staged_reference_logits(model, input_ids, pixel_values, stages)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def dropped_positions(prompt: list[int], kept: list[list[int]]) -> set[int]:
    """Prompt positions of the image tokens not in `kept` (per image, raster ids)."""
    dropped = set()
    for image, raster in enumerate(kept):
        slots = image_slots(prompt, image)
        dropped |= {slots[r] for r in range(TOKENS_PER_IMAGE) if r not in set(raster)}
    return dropped


def test_image_guided_scores_of_a_case_checked_by_hand() -> None:
    """Three tokens of image 0 at positions 1-3 and one of image 1 at position 4. Rows (over 6 positions):
    q0 (pos 1): [.5 .5 0 0 0 0]; q1 (pos 2): [.2 .3 .5 0 0 0]; q2 (pos 3): [.1 .2 .3 .4 0 0];
    q3 (pos 4, image 1): [.1 .3 .3 .1 .2 0]. Image 0's tokens collect only image 0's rows:
    token 0: .5 + .3 + .2 = 1.0, token 1: .5 + .3 = .8, token 2: .4; token 3: .2 (its own row only).
    With a budget of 2 for image 0, tokens 0 and 1 stay."""
    attention = torch.tensor(
        [
            [
                [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
                [0.2, 0.3, 0.5, 0.0, 0.0, 0.0],
                [0.1, 0.2, 0.3, 0.4, 0.0, 0.0],
                [0.1, 0.3, 0.3, 0.1, 0.2, 0.0],
            ]
        ]
    )
    ones = torch.ones(1, 4, dtype=torch.bool)
    layout = VisualLayout(
        seq_index=torch.tensor([[1, 2, 3, 4]]),
        image_index=torch.tensor([[0, 0, 0, 1]]),
        row=torch.zeros(1, 4, dtype=torch.long),
        col=torch.tensor([[0, 1, 2, 0]]),
        grid_h=torch.ones(1, 4, dtype=torch.long),
        grid_w=torch.tensor([[3, 3, 3, 1]]),
        valid=ones,
        prunable=ones,
    )
    rows = ImageRows(attention, ones, torch.tensor([[0, 1, 2, 3]]))
    inputs = ScoringInputs(
        layout=layout,
        alive=ones,
        input_ids=torch.zeros(1, 6, dtype=torch.long),
        attention_mask=torch.ones(1, 6, dtype=torch.long),
        budget=lambda n: 2,
        stage=1,
        observations={IMAGE_STAGE: rows},
    )
    scores = METHODS.get("himap")().score(inputs)
    assert scores[0].tolist() == pytest.approx([1.0, 0.8, 0.4, 0.2])
    assert top_k(scores[0, :3], 2) == [0, 1]
    assert TEXT_STAGE.stage == 0 and IMAGE_STAGE.stage == 1


def test_cached_generation_equals_recomputing_without_cache() -> None:
    model = llava_model()
    input_ids, pixel_values = torch.tensor([TWO_IMAGES]), pixels(2, seed=3)
    new_tokens = 5
    strategy = build_strategy("himap", layer=LAYERS, ratio=[0.5, 0.25], prior={"name": "exponential"})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        cached = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
        )[0, input_ids.shape[1] :].tolist()
    rasters = stage_rasters(pruner.last_record)
    prompt = TWO_IMAGES
    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        stages = [
            (layer, [p for p in range(sequence.shape[1]) if p not in dropped_positions(prompt, kept)], None)
            for layer, kept in zip(LAYERS, rasters, strict=True)
        ]
        logits = staged_reference_logits(model, sequence, pixel_values, stages)
        token = int(logits[0, -1].argmax())
        recomputed.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert cached == recomputed


def test_the_preset_scales_to_the_model_and_refuses_a_third_stage() -> None:
    strategy = build_strategy("himap")
    assert (strategy.layer, strategy.ratio, strategy.reference_depth) == ((2, 8), (0.5, 0.125), 32)
    assert strategy.resolve(ModelFacts("llava", 32)).layers == (2, 8)
    assert strategy.resolve(ModelFacts("llava", 4)).layers == (1, 2)
    assert [stage.budget(576) for stage in strategy.stages()] == [288, 72]  # the official 288 / 72 of 576
    with pytest.raises(ValueError, match=r"himap: its rule has at most 2 pruning stages"):
        build_strategy("himap", layer=[1, 2, 3], ratio=[0.5, 0.25, 0.1]).resolve()


def test_the_run_on_the_embedded_model_keeps_16_tokens(tmp_path: Path) -> None:
    out = tmp_path / "himap"
    result = run_program(
        "strategy=himap",
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
