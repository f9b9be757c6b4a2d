"""The temporal prior and the frame inputs of priors: recency over the frames of a video (PoRe's bias over
time), on its own and inside the engine on a tiny Qwen2-VL video, against a reference written by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pore import Pruner, build_strategy
from pore.priors.base import PriorConfig
from qwen_reference import tiny_model, video_inputs

pytestmark = pytest.mark.transformers  # runs a Qwen2-VL video through the engine


def test_weights_decay_over_frames_and_leave_images_alone() -> None:
    prior = PriorConfig.from_mapping({"name": "temporal", "frame_sigma": 2.0})
    zeros = torch.zeros(4, dtype=torch.long)
    grid = torch.full((4,), 2)
    frame, frames = torch.tensor([0, 1, 2, 3]), torch.full((4,), 4)
    weights = prior.weights(zeros, zeros, grid, grid, frame, frames)
    expected = [math.exp(-2.0 * f / 3) for f in range(4)]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    # An image (no frame input, or one frame): weight 1 wherever the token sits.
    rows = torch.tensor([0, 1, 0, 1])
    assert prior.weights(rows, zeros, grid, grid).tolist() == [1.0] * 4
    # space_sigma adds PoRe's exponential row prior inside each frame.
    both = PriorConfig.from_mapping({"name": "temporal", "frame_sigma": 1.0, "space_sigma": 3.0})
    weights = both.weights(rows, zeros, grid, grid, frame, frames)
    expected = [math.exp(-f / 3 - 3.0 * r) for f, r in zip(range(4), [0, 1, 0, 1], strict=True)]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("setting", ["frame_sigma", "space_sigma"])
def test_negative_sigmas_are_refused_with_the_setting_name(setting: str) -> None:
    with pytest.raises(ValueError, match=f"temporal prior: {setting} must be >= 0"):
        PriorConfig.from_mapping({"name": "temporal", setting: -1.0}).validate()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_the_temporal_prior_reweights_video_tokens_by_frame(family: str) -> None:
    """FastV x temporal prior keeps, per item, the top-3 of layer K-1's eager attention (last prompt token,
    mean over heads) times exp(-frame_sigma * frame / (frames - 1)), written out by hand: the video's 2
    frames of 4 tokens and the image's one frame (weight 1)."""
    model, eager = tiny_model(family), tiny_model(family, "eager")
    inputs = video_inputs(family)
    sigma = 3.0
    with torch.no_grad():
        attention = eager(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(dim=0).double()
        strategy = build_strategy("fastv", keep=3, layer=2, prior={"name": "temporal", "frame_sigma": sigma})
        with Pruner(model, strategy) as pruner:
            model(**inputs)
    video = [(p, math.exp(-sigma * (i // 4))) for i, p in enumerate(range(2, 10))]  # frames 0, 0, 0, 0, 1...
    image = [(p, 1.0) for p in range(13, 17)]
    expected = []
    for item in (video, image):
        scores = [float(attention[p]) * w for p, w in item]
        expected.append(sorted(sorted(range(len(item)), key=lambda i, s=scores: (-s[i], i))[:3]))
    assert pruner.last_record.kept_raster == [expected]
    # Without the prior the choice differs (the last frame's tokens lose weight), so the test can fail.
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=3, layer=2)) as plain:
        model(**inputs)
    assert plain.last_record.kept_raster[0][0] != expected[0]
