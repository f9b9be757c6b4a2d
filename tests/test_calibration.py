"""Measured priors: fits on synthetic profiles, the calibrated prior's weights, a planted bias recovered.

The planted bias is a real model change: the q/k projections of one decoder layer of a tiny random LLaVA
are replaced by constant vectors (zero weights, a bias along one rotary frequency pair), so its attention is
content-free and RoPE alone makes it grow towards the late (bottom) image tokens. Calibration must find
that bias, its fits must say so, and pruning with the measured prior must undo what FastV does with it.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import GRID, build_tiny_llava, left_pad, make_prompt, pixels
from pipeline_fixtures import OFFLINE_ENV, REPO, run_cli
from pore import Pruner, build_strategy
from pore.adapters import ModelFacts
from pore.assets import asset_path
from pore.calibration import fit_exponential, fit_forms, fit_linear, load_prior_file
from pore.calibration.measure import Calibrator, RopeGravity
from pore.priors import PriorConfig
from pore.priors.calibrated import FORMAT, calibrated_weights, save_prior_file

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PLANTED_LAYER = 1  # decoder layer whose attention is planted: what strategy.layer = 2 scores
PAIR = 3  # rotary pair of the planted direction: slow enough to be monotone over the image's distances


# ---------------------------------------------------------------------------------------------- fits


@pytest.mark.parametrize("sigma", [-1.0, 0.0, 0.5, 1.3, 3.0])
def test_exponential_fit_recovers_sigma_exactly(sigma: float) -> None:
    p = np.arange(24) / 23
    fit = fit_exponential(p, 0.7 * np.exp(sigma * p))
    assert fit.value == pytest.approx(sigma, abs=1e-5)
    assert fit.mu == pytest.approx(0.7, rel=1e-5)
    assert fit.rmse < 1e-6
    assert not fit.at_bound
    if sigma != 0.0:
        assert fit.r2 == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("alpha", [-0.8, 0.3, 0.6, 0.9])
def test_linear_fit_recovers_alpha_exactly(alpha: float) -> None:
    p = np.arange(24) / 23
    fit = fit_linear(p, 1.4 / (1 - alpha * p))
    assert fit.value == pytest.approx(alpha, abs=1e-5)
    assert fit.mu == pytest.approx(1.4, rel=1e-5)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    # The fitted weight cancels the bias: profile * w is flat.
    assert np.allclose(1.4 / (1 - alpha * p) * fit.weight(p), 1.4)


def test_fits_recover_parameters_under_noise() -> None:
    """5 % multiplicative noise on a 24-row profile: the parameters stay within a few hundredths."""
    rng = np.random.default_rng(0)
    p = np.arange(24) / 23
    sigmas, alphas = [], []
    for _ in range(20):
        noise = 1 + 0.05 * rng.standard_normal(24)
        sigmas.append(fit_exponential(p, np.exp(1.3 * p) * noise).value)
        alphas.append(fit_linear(p, 1 / (1 - 0.6 * p) * noise).value)
    assert np.mean(sigmas) == pytest.approx(1.3, abs=0.03)
    assert np.std(sigmas) < 0.08
    assert np.mean(alphas) == pytest.approx(0.6, abs=0.02)
    assert np.std(alphas) < 0.05
    noisy = fit_forms(p, np.exp(1.3 * p) * (1 + 0.05 * rng.standard_normal(24)))
    assert noisy["exponential"].r2 > 0.95
    assert noisy["exponential"].r2 > noisy["linear"].r2  # the right form fits better


def test_fit_edge_cases() -> None:
    p = np.arange(8) / 7
    flat = fit_forms(p, np.ones(8))
    assert flat["exponential"].value == pytest.approx(0.0, abs=1e-6)
    assert flat["exponential"].r2 is None  # nothing to explain
    assert fit_exponential(p, np.exp(60 * p)).at_bound  # beyond the search range: flagged
    weighted = fit_exponential(np.r_[p, p], np.r_[np.exp(p), np.exp(3 * p)], np.r_[np.ones(8), np.zeros(8)])
    assert weighted.value == pytest.approx(1.0, abs=1e-5)  # zero weights are ignored
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_linear(p * 2, np.ones(8))
    with pytest.raises(ValueError, match="finite"):
        fit_linear(p, np.r_[np.ones(7), np.nan])


# ------------------------------------------------------------------------------- the calibrated prior


def grid(h: int, w: int) -> tuple[torch.Tensor, ...]:
    index = torch.arange(h * w)
    return index // w, index % w, torch.full_like(index, h), torch.full_like(index, w)


PROFILE = [[0.5, 1.0, 2.0], [0.25, 1.0, 4.0]]  # 2 x 3, by hand
GRAVITY = [[1.0, 1.0, 1.0], [1.0, 2.0, 4.0]]


def write_prior(folder: Path, layer: int = 2, buckets: dict | None = None) -> Path:
    """A prior file written by hand (the format the calibration writes)."""
    if buckets is None:
        buckets = {
            "2x3": {
                "grid_h": 2,
                "grid_w": 3,
                "count": 10,
                "profile2d": PROFILE,
                "row_profile": [sum(row) / 3 for row in PROFILE],
                "gravity2d": GRAVITY,
            }
        }
    data = {
        "format": FORMAT,
        "model": "hand",
        "layer": layer,
        "scoring_layer": layer - 1,
        "count": 10,
        "buckets": buckets,
        "fits": {"linear": {"alpha": 0.5}, "exponential": {"sigma": 2.0}},
        "fits_index": {"linear": {"alpha": -0.5}, "exponential": {"sigma": -1.0}},
    }
    return save_prior_file(data, folder / f"layer{layer}.json")


def weights_of(
    path: Path, form: str, h: int = 2, w: int = 3, position: str = "row", **settings
) -> torch.Tensor:
    prior = PriorConfig("calibrated", position=position, params={"path": str(path), "form": form, **settings})
    return prior.weights(*grid(h, w)).view(h, w)


def test_calibrated_prior_divides_by_the_measured_profile_exactly(tmp_path: Path) -> None:
    path = write_prior(tmp_path)
    # profile2d: w = (1 / profile) / max(1 / profile) = min(profile) / profile.
    expected = torch.tensor([[0.25 / 0.5, 0.25 / 1, 0.25 / 2], [1.0, 0.25, 0.25 / 4]], dtype=torch.float64)
    assert torch.allclose(weights_of(path, "profile2d"), expected)
    # profile: by row means (3.5 / 3 and 5.25 / 3): the top row gets 1, the bottom 3.5 / 5.25.
    rows = torch.tensor([[1.0] * 3, [3.5 / 5.25] * 3], dtype=torch.float64)
    assert torch.allclose(weights_of(path, "profile"), rows)
    gravity = torch.tensor([[1, 1, 1], [1, 0.5, 0.25]], dtype=torch.float64)
    assert torch.allclose(weights_of(path, "gravity"), gravity)
    # Fitted forms: w = 1 - alpha p and exp(-sigma p), largest weight 1; by index, negative values too.
    p_row = torch.tensor([[0.0] * 3, [1.0] * 3], dtype=torch.float64)
    assert torch.allclose(weights_of(path, "linear"), 1 - 0.5 * p_row)
    assert torch.allclose(weights_of(path, "exponential"), torch.exp(-2.0 * p_row))
    p_index = torch.arange(6, dtype=torch.float64).view(2, 3) / 5
    assert torch.allclose(weights_of(path, "linear", position="index"), (1 + 0.5 * p_index) / 1.5)
    assert torch.allclose(weights_of(path, "exponential", position="index"), torch.exp(p_index) / math.e)


def test_floor_bounds_the_weights(tmp_path: Path) -> None:
    path = write_prior(tmp_path)
    clamped = weights_of(path, "profile2d", floor=1.0)  # profiles below 1 count as 1
    assert torch.allclose(clamped, torch.tensor([[1, 1, 0.5], [1, 1, 0.25]], dtype=torch.float64))
    for form in ("profile", "profile2d", "gravity", "linear", "exponential"):
        weights = weights_of(path, form)
        assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
        assert float(weights.max()) == pytest.approx(1.0)


def test_other_grid_sizes_are_resampled_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    smooth = [[1.0 + r for _ in range(3)] for r in range(3)]  # 3 x 3, rising by row
    buckets = {
        "3x3": {"grid_h": 3, "grid_w": 3, "count": 5, "profile2d": smooth},
        "2x2": {"grid_h": 2, "grid_w": 2, "count": 1, "profile2d": [[1.0, 1.0], [1.0, 1.0]]},
    }
    path = write_prior(tmp_path, buckets=buckets)
    assert torch.allclose(weights_of(path, "profile2d", 2, 2), torch.ones(2, 2, dtype=torch.float64))
    with caplog.at_level(logging.WARNING, logger="pore"):
        resampled = weights_of(path, "profile2d", 5, 4)
    assert "no 5x4 grid" in caplog.text and "resampling its 3x3" in caplog.text
    # Bilinear on normalised coordinates: rows 1, 1.5, 2, 2.5, 3 (top and bottom rows coincide).
    expected = torch.tensor([1 / v for v in (1, 1.5, 2, 2.5, 3)], dtype=torch.float64)[:, None].expand(5, 4)
    assert torch.allclose(resampled, expected)
    assert torch.allclose(weights_of(path, "profile", 5, 4), expected)  # row profile: linear along rows


def test_layer_is_checked_and_picks_the_file_of_a_folder(tmp_path: Path) -> None:
    write_prior(tmp_path, layer=2)
    write_prior(tmp_path, layer=3, buckets={"2x3": {"grid_h": 2, "grid_w": 3, "profile2d": GRAVITY}})
    strategy = build_strategy("pore_calibrated", keep=2, prior={"path": str(tmp_path), "form": "profile2d"})
    assert strategy.prior.strategy_layer == 2
    assert torch.allclose(
        strategy.prior.weights(*grid(2, 3)).view(2, 3), weights_of(tmp_path / "layer2.json", "profile2d")
    )
    at_three = strategy.replace(layer=3)
    assert torch.allclose(
        at_three.prior.weights(*grid(2, 3)).view(2, 3), weights_of(tmp_path / "layer3.json", "profile2d")
    )
    one_file = build_strategy("pore_calibrated", layer=3, prior={"path": str(tmp_path / "layer2.json")})
    with pytest.raises(ValueError, match=r"measured for strategy.layer=2 .* prunes before layer 3"):
        one_file.resolve()
    build_strategy(
        "pore_calibrated", layer=3, prior={"path": str(tmp_path / "layer2.json"), "check_layer": False}
    ).resolve()
    listed = r"no prior for strategy.layer=1 .*'layer2.json', 'layer3.json'"
    with pytest.raises(FileNotFoundError, match=listed):
        build_strategy("pore_calibrated", layer=1, prior={"path": str(tmp_path)}).resolve()
    with pytest.raises(ValueError, match="valid forms: profile, profile2d, linear, exponential, gravity"):
        weights_of(tmp_path / "layer2.json", "quadratic")
    with pytest.raises(ValueError, match=r"needs strategy\.prior\.path"):
        calibrated_weights(*grid(2, 3), path=None)


def test_the_shipped_calibration_is_the_registered_default() -> None:
    strategy = build_strategy("pore_calibrated")
    assert strategy.prior.hyperparameters()["path"] == asset_path("calibration/tiny_llava/spatial")
    for layer in (1, 2, 3):
        prior = load_prior_file(asset_path("calibration/tiny_llava/spatial"), layer)
        assert prior.data["layer"] == layer and prior.data["count"] == 400
        assert set(prior.buckets) == {"8x8"}
        strategy.replace(layer=layer).resolve(ModelFacts("llava", 4, pads_to_square=True))


# ----------------------------------------------------------------------------- a planted position bias


def plant_bias(model: nn.Module, layer: int, strength: float) -> nn.Module:
    """Make `layer`'s attention content-free: q = k = sqrt(strength) * u for every token, with u on one
    rotary pair, through real weights (zero projection, a bias). The logits are then
    scaling * strength * cos(distance * theta): largest for the nearest, i.e. latest, tokens."""
    attention = model.model.language_model.layers[layer].self_attn
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    direction = torch.zeros(head_dim)
    direction[PAIR] = 1.0
    with torch.no_grad():
        for name, heads in (("q_proj", text.num_attention_heads), ("k_proj", text.num_key_value_heads)):
            old = getattr(attention, name)
            new = nn.Linear(old.in_features, old.out_features, bias=True)
            new.weight.zero_()
            new.bias.copy_(math.sqrt(strength) * direction.repeat(heads))
            setattr(attention, name, new)
    return model


def batches(count: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded prompts of one image with text of varying length before and after it."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(1, 90, (length,), generator=generator).tolist()

    for index in range(count):
        prompts = [make_prompt(tokens(2, 6), 1, tokens(3, 9)) for _ in range(4)]
        ids, mask = left_pad(prompts)
        yield {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(4, seed=seed * 100 + index)}


def calibrate(model: nn.Module, **settings) -> dict:
    with Calibrator(model, [PLANTED_LAYER + 1], **settings) as calibrator:
        for inputs in batches(4):
            calibrator.update(inputs, pad_token_id=0)
    return calibrator.results()[PLANTED_LAYER + 1].to_prior({"model": "tiny"})


@pytest.fixture(scope="module")
def planted() -> nn.Module:
    return plant_bias(build_tiny_llava(), PLANTED_LAYER, strength=16.0)


def test_calibration_recovers_a_planted_late_bias(planted: nn.Module) -> None:
    prior = calibrate(planted)
    bucket = prior["buckets"][f"{GRID}x{GRID}"]
    rows = np.array(bucket["row_profile"])
    assert prior["count"] == 16 and bucket["count"] == 16
    assert np.all(np.diff(rows) > 0), rows  # attention rises row after row
    assert rows[-1] / rows[0] > 5
    assert bucket["bottom_half_share"] > 0.75  # uniform: 0.5
    exponential, linear = prior["fits"]["exponential"], prior["fits"]["linear"]
    assert 1.5 < exponential["sigma"] < 2.5 and exponential["r2"] > 0.95
    assert 0.6 < linear["alpha"] < 0.95 and linear["r2"] > 0.85
    assert prior["fits_index"]["exponential"]["sigma"] > 1.5
    # The gravity's logit scale is the planted one: scaling * |q| * |k| = 16 / sqrt(head_dim 16).
    assert prior["gravity"]["mean_logit_scale"] == pytest.approx(4.0, rel=1e-4)

    control = calibrate(build_tiny_llava())  # the same model without the plant
    assert control["fits"]["exponential"]["sigma"] < exponential["sigma"] - 1.0


def test_gravity_along_the_planted_direction_is_the_measured_attention(planted: nn.Module) -> None:
    """The planted layer's attention is RoPE-only, so gravity along its direction must reproduce it."""
    direction = torch.zeros(1, 16)
    direction[0, PAIR] = 1.0
    prior = calibrate(planted, gravity_directions=direction)
    bucket = prior["buckets"][f"{GRID}x{GRID}"]
    assert np.allclose(bucket["gravity2d"], bucket["profile2d"], rtol=1e-3, atol=1e-4)


def test_rope_gravity_cosine_is_the_rotary_formula() -> None:
    """cos(R_m u, R_n u) = sum_i (u_i^2 + u_{i+D/2}^2) cos((n - m) theta_i) for standard RoPE."""
    model = build_tiny_llava()
    rotary = model.model.language_model.rotary_emb
    gravity = RopeGravity(rotary, head_dim=16, directions=8, seed=3)
    keys = torch.tensor([0, 5, 17, 40, 41])
    cosine = gravity.cosine(50, keys)  # (8, 5)
    theta = rotary.inv_freq.double()  # (8,)
    u = gravity.directions
    energy = u[:, :8] ** 2 + u[:, 8:] ** 2  # (R, pairs)
    expected = energy @ torch.cos((keys.double() - 50)[None, :] * theta[:, None])
    assert torch.allclose(cosine, expected, atol=1e-9)
    shares = gravity.attention(50, keys, torch.full((4,), 3.0))
    assert shares.shape == (5,) and float(shares.sum()) == pytest.approx(1.0)


def test_the_measured_prior_undoes_the_planted_bias_when_pruning(planted: nn.Module, tmp_path: Path) -> None:
    save_prior_file(calibrate(planted), tmp_path / "layer2.json")

    def mean_kept_row(strategy) -> float:
        rows = []
        with Pruner(planted, strategy) as pruner, torch.no_grad():
            for inputs in batches(3, seed=7):  # prompts the calibration has not seen
                planted(**inputs)
                rows += [index // GRID for kept in pruner.last_record.kept_raster for index in kept[0]]
        return sum(rows) / len(rows)

    fastv = mean_kept_row(build_strategy("fastv", keep=6))
    assert fastv == pytest.approx(GRID - 1)  # FastV keeps only the bottom row
    for form in ("profile", "profile2d", "exponential"):
        strategy = build_strategy("pore_calibrated", keep=6, prior={"path": str(tmp_path), "form": form})
        assert mean_kept_row(strategy) < fastv - 1.5, form


def test_pruner_scores_are_the_attention_divided_by_the_profile(tmp_path: Path) -> None:
    """Through the real engine: pore_calibrated's ranked scores = FastV's scores x min(profile) / profile."""
    model = build_tiny_llava()
    profile = torch.linspace(0.5, 2.0, GRID * GRID, dtype=torch.float64).view(GRID, GRID)
    entry = {"grid_h": GRID, "grid_w": GRID, "count": 1, "profile2d": profile.tolist()}
    write_prior(tmp_path, buckets={f"{GRID}x{GRID}": entry})
    inputs = next(batches(1))
    scores = {}
    for name, strategy in (
        ("fastv", build_strategy("fastv", keep=4)),
        (
            "calibrated",
            build_strategy("pore_calibrated", keep=4, prior={"path": str(tmp_path), "form": "profile2d"}),
        ),
    ):
        with Pruner(model, strategy) as pruner, torch.no_grad():
            model(**inputs)
            scores[name] = pruner.last_record.scores
    expected = scores["fastv"] * (0.5 / profile.reshape(-1))[None, :]
    assert torch.allclose(scores["calibrated"], expected, rtol=1e-9, atol=0)


def test_calibrator_restores_the_attention_implementation() -> None:
    model = build_tiny_llava()
    with Calibrator(model, [2]) as calibrator:
        assert model.config.text_config._attn_implementation == "pore_sdpa"
        calibrator.update(next(batches(1)), pad_token_id=0)
    assert model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"K in \[1, 3\]"):
        Calibrator(model, [4])


# ------------------------------------------------------------------------------------ the commands


def test_calibrate_command_on_the_embedded_model(tmp_path: Path) -> None:
    out = tmp_path / "cal"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / "calibrate.py"),
            "data.limit=24",
            "calibrate.layers=[1,2]",
            "logger=wandb",
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **OFFLINE_ENV},
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linear alpha" in result.stdout and "strategy=pore_calibrated" in result.stdout
    for layer in (1, 2):
        prior = json.loads((out / f"layer{layer}.json").read_text())
        assert prior["format"] == FORMAT and prior["layer"] == layer and prior["scoring_layer"] == layer - 1
        assert prior["count"] == 24 and prior["data"]["limit"] == 24 and prior["model_name"] == "tiny_llava"
        bucket = prior["buckets"]["8x8"]
        assert np.mean(bucket["profile2d"]) == pytest.approx(1.0, abs=1e-5)
        assert set(prior["fits"]) == {"linear", "exponential"} and prior["gravity"]["directions"] == 64
        with Image.open(out / f"layer{layer}_heatmap.png") as image:
            assert image.format == "PNG" and image.size == (1120, 500)  # measured + gravity panels
        with Image.open(out / f"layer{layer}_by_row.png") as image:
            assert image.size == (860, 500)
    with Image.open(out / "by_row_layers.png") as image:
        assert image.size == (860, 500)
    # logger=wandb: the pictures as W&B images, the prior files saved with the run (offline here).
    (run,) = (out / "wandb").glob("offline-run-*")
    logged = sorted(p.name for p in (run / "files" / "media" / "images" / "calibration").glob("*.png"))
    assert [name.split("_0_")[0] for name in logged] == [
        "by_row_layers",
        "layer1_by_row",
        "layer1_heatmap",
        "layer2_by_row",
        "layer2_heatmap",
    ]
    assert (run / "files" / "layer2.json").exists()


def test_pore_calibrated_runs_end_to_end(tmp_path: Path) -> None:
    """The real pipeline (CLI) on the embedded model, with the prior measured for that model."""
    out = tmp_path / "run"
    result = run_cli(
        "strategy=pore_calibrated",
        "strategy.prior.form=profile2d",
        "strategy.keep=8",
        "data.limit=16",
        "logger=none",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(row["kept_visual_indices"]) == 8 for row in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eff/visual_tokens"] == 8 and metrics["spatial/acc"] > 0.3
    for name in ("kept_by_row", "kept_map", "samples"):
        with Image.open(out / "figures" / f"{name}.png") as image:
            assert image.format == "PNG"
