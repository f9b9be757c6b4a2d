"""PoRe as its authors run it: the presets compose from the real config and build the authors' settings, and
FastV's budget is cut to the tokens that are not padding, checked against a by-hand top-k of eager attention.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import pore
from conftest import GRID, IMAGE_TOKEN, TOKENS_PER_IMAGE, build_tiny_llava, left_pad, make_prompt, pixels
from pore import Pruner, build_strategy
from pore.adapters import ModelFacts
from pore.app.config import build_strategy as strategy_from_config
from pore.app.identity import register_resolvers

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

CONF = Path(__file__).resolve().parent.parent / "conf"
PROMPTS = [make_prompt([1, 5, 6], 1, [7, 8, 9, 10]), make_prompt([1, 11], 1, [12, 13, 14, 15, 16, 17])]
# pore_authors_fastv: the authors' FastV curve, 1 / w = 1 + a p + b p^2 + c p^3 over p = i / (N - 1)
FASTV_INVERSE = (1.0, 1.733738621924, -4.826433446361, 4.884125654044)


def content_tokens(height: int, width: int) -> list[int]:
    """Raster ids of the GRID x GRID tokens of a 200 x 300 / 300 x 200 image that are not padding, by hand.

    The image is pasted centred in a 300 x 300 square (50 px per grid cell): the 50 px border on either side
    of the short dimension is exactly one row (or column) of padding.
    """
    assert {height, width} == {200, 300}
    keep_rows = range(1, GRID - 1) if height < width else range(GRID)
    keep_cols = range(1, GRID - 1) if width < height else range(GRID)
    return [r * GRID + c for r in keep_rows for c in keep_cols]


def by_hand_top_k(prompt: list[int], seed: int, keep: int, allowed: list[int]) -> list[int]:
    """FastV at K = 2 with the authors' weights: top-`keep` of layer 1's last-token attention (head mean)
    times their FastV curve at p = i / (N - 1), among the `allowed` raster ids only; sorted raster ids."""
    eager = build_tiny_llava("eager")
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = eager(input_ids=input_ids, pixel_values=pixels(1, seed=seed), output_attentions=True)
    last_row = out.attentions[1][0][:, -1, :].mean(dim=0).double()  # (L,) layer K - 1 = 1
    image = (input_ids[0] == IMAGE_TOKEN).nonzero().flatten()  # (N,) sequence positions of the raster
    p = torch.arange(TOKENS_PER_IMAGE, dtype=torch.float64) / (TOKENS_PER_IMAGE - 1)
    weight = 1.0 / sum(coefficient * p**power for power, coefficient in enumerate(FASTV_INVERSE))
    scores = {i: (last_row[image[i]] * weight[i]).item() for i in allowed}
    ranking = sorted(allowed, key=lambda i: (-scores[i], i))
    return sorted(ranking[:keep])


def authors_fastv(keep: int, **prior: object) -> pore.Strategy:
    return build_strategy("pore_authors_fastv", keep=keep, prior=prior)


@pytest.mark.parametrize("size", [(200, 300), (300, 200)], ids=["wide", "tall"])
@pytest.mark.parametrize("keep", [9, 30])
def test_fastv_budget_is_the_top_keep_among_unpadded_tokens(size: tuple[int, int], keep: int) -> None:
    """keep <= 24 unpadded tokens: the top-keep among them; keep = 30 > 24: all 24, and no padding token."""
    model = build_tiny_llava()
    unpadded = content_tokens(*size)
    assert len(unpadded) == 24
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad(), Pruner(model, authors_fastv(keep)) as pruner:
            pruner.set_image_sizes([[size]])
            model(input_ids=torch.tensor([prompt]), pixel_values=pixels(1, seed=b))
        kept = pruner.last_record.kept_raster[0][0]
        assert kept == by_hand_top_k(prompt, b, keep, unpadded)
        assert len(kept) == min(keep, 24)
        assert int(pruner.last_record.visual_tokens[-1, 0]) == min(keep, 24)


def test_without_the_cut_the_budget_is_filled_with_padding_tokens() -> None:
    """The option matters: padding suppression alone keeps 30 tokens, 6 of them padding (score 0)."""
    model = build_tiny_llava()
    unpadded = set(content_tokens(200, 300))
    with torch.no_grad(), Pruner(model, authors_fastv(30, budget_from_unpadded=False)) as pruner:
        pruner.set_image_sizes([[(200, 300)]])
        model(input_ids=torch.tensor([PROMPTS[0]]), pixel_values=pixels(1))
    kept = pruner.last_record.kept_raster[0][0]
    assert len(kept) == 30
    assert len(set(kept) - unpadded) == 6


def test_square_images_lose_nothing_to_the_cut() -> None:
    model = build_tiny_llava()
    with torch.no_grad(), Pruner(model, authors_fastv(30)) as pruner:
        pruner.set_image_sizes([[(300, 300)]])
        model(input_ids=torch.tensor([PROMPTS[0]]), pixel_values=pixels(1))
    assert pruner.last_record.kept_raster[0][0] == by_hand_top_k(PROMPTS[0], 0, 30, list(range(36)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_with_cut_budgets_equals_single_samples(attn: str) -> None:
    """A wide image (budget cut to 24) next to a square one (30 kept) in one padded batch: same tokens
    and the same greedy answers as each sample alone."""
    model = build_tiny_llava(attn)
    sizes = [(200, 300), (300, 300)]
    input_ids, mask = left_pad(PROMPTS)
    pixel_values = torch.cat([pixels(1, seed=b) for b in range(len(PROMPTS))])
    with torch.no_grad(), Pruner(model, authors_fastv(30)) as pruner:
        pruner.set_image_sizes([[size] for size in sizes])
        batch_out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            max_new_tokens=5,
            do_sample=False,
        )[:, input_ids.shape[1] :]
        batch_kept = pruner.last_record.kept_raster
        assert [len(kept[0]) for kept in batch_kept] == [24, 30]
        for b, prompt in enumerate(PROMPTS):
            pruner.set_image_sizes([[sizes[b]]])
            alone = model.generate(
                input_ids=torch.tensor([prompt]),
                pixel_values=pixels(1, seed=b),
                max_new_tokens=5,
                do_sample=False,
            )[:, len(prompt) :]
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            assert alone[0].tolist() == batch_out[b].tolist()


@pytest.mark.parametrize(("second", "kept_in_the_end"), [(20, 20), (28, 24)])
def test_a_later_stage_may_ask_for_more_than_the_cut_left(second: int, kept_in_the_end: int) -> None:
    """Two stages with the cut: the first keeps the 24 unpadded tokens (budget 30), the second `second` of
    them, or all 24 when it asks for more than the cut left; a budget that grows is still refused."""
    model = build_tiny_llava()
    strategy = authors_fastv(30).replace(method="pdrop", layer=(1, 2), keep=(30, second))
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        pruner.set_image_sizes([[(200, 300)]])
        model(input_ids=torch.tensor([PROMPTS[0]]), pixel_values=pixels(1))
        kept = pruner.last_record.kept_raster[0][0]
        assert len(kept) == kept_in_the_end and set(kept) <= set(content_tokens(200, 300))
    growing = authors_fastv(30).replace(method="pdrop", layer=(1, 2), keep=(20, 30))
    with pytest.raises(ValueError, match="grows from stage to stage"):
        Pruner(model, growing)


def test_the_cut_needs_padding_suppression() -> None:
    with pytest.raises(ValueError, match=r"set strategy\.prior\.suppress_padding=true as well"):
        authors_fastv(30, suppress_padding=False).resolve()


# ---------------------------------------------------------------------------------------------------------
# The presets, composed from the real config tree.

Compose = Callable[..., DictConfig]
PRESETS = ("pore_authors_fastv", "pore_authors_pdrop", "pore_authors_sparsevlm")


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    register_resolvers()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield functools.cache(lambda *overrides: hydra.compose("config", overrides=list(overrides)))


def test_fastv_preset_is_the_authors_setting(compose: Compose) -> None:
    strategy = strategy_from_config(compose("strategy=pore_authors_fastv"))
    assert (strategy.method, strategy.layer, strategy.keep, strategy.reweight) == ("fastv", 2, 128, "first")
    prior = strategy.prior
    assert (prior.name, prior.position, prior.hyperparameters()) == ("pore_fastv_curve", "index", {})
    assert (prior.suppress_padding, prior.pad_threshold, prior.budget_from_unpadded) == (True, 0.5, True)
    assert not prior.require_data  # one curve for every benchmark
    # The curve: row starts fall from 1.0 to 0.39409 over the 24 rows of LLaVA-1.5 (the authors' file).
    first_and_last_row, first_column, side = (
        torch.tensor([0, 23]),
        torch.zeros(2, dtype=torch.long),
        torch.full((2,), 24),
    )
    row_starts = prior.weights(first_and_last_row, first_column, side, side)
    assert row_starts.tolist() == pytest.approx([1.0, 0.39409], abs=1e-5)
    strategy.resolve(ModelFacts("llava", 32, pads_to_square=True))


@pytest.mark.parametrize(
    ("preset", "method", "layer", "ratio", "keep", "sigma", "threshold"),
    [
        ("pore_authors_pdrop", "pdrop", (2, 10, 20), (0.32, 0.16, 0.08), None, 1.915, 0.01),
        ("pore_authors_sparsevlm", "sparsevlm", (3, 7, 16), None, (303, 110, 36), 1.995, 0.5),
    ],
)
def test_pdrop_and_sparsevlm_presets_are_the_authors_settings(
    compose: Compose,
    preset: str,
    method: str,
    layer: object,
    ratio: object,
    keep: object,
    sigma: float,
    threshold: float,
) -> None:
    strategy = strategy_from_config(compose(f"strategy={preset}"))
    assert (strategy.method, strategy.layer, strategy.ratio, strategy.keep) == (method, layer, ratio, keep)
    assert strategy.reweight == "first"
    assert [stage.reweight for stage in strategy.stages()] == [True] + [False] * (len(strategy.stages()) - 1)
    prior = strategy.prior
    assert (prior.name, prior.position, prior.hyperparameters()) == ("exponential", "index", {"sigma": sigma})
    assert (prior.suppress_padding, prior.pad_threshold, prior.budget_from_unpadded) == (
        True,
        threshold,
        False,
    )
    assert prior.require_data  # the sigma of the benchmark being run (sigma_by_data), else refused
    strategy.resolve(ModelFacts("llava", 32, pads_to_square=True))


@pytest.mark.parametrize("preset", ["pore_authors_pdrop", "pore_authors_sparsevlm"])
def test_sigma_is_chosen_by_the_data_name(compose: Compose, preset: str) -> None:
    """sigma_by_data maps data.name to sigma (the authors' value; an entry may be changed or added); a
    benchmark without an entry is refused; a sigma typed on the command line wins over both."""
    table = ("strategy.prior.sigma_by_data.gqa=2.38", "+strategy.prior.sigma_by_data.spatial=1.45")

    def sigma(*overrides: str) -> float:
        """The sigma a run with these command-line overrides prunes with."""
        cfg = hydra.compose("config", [f"strategy={preset}", *table, *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # what the run's command line typed (as @hydra.main sets it)
        try:
            strategy = strategy_from_config(cfg).resolve(data=str(cfg.data.name))
        finally:
            HydraConfig.instance().cfg = None
        return strategy.prior.hyperparameters()["sigma"]

    authors = pore.build_strategy(preset).prior.params["sigma_by_data"]
    assert sigma("data=gqa") == 2.38
    assert sigma("data=spatial") == 1.45
    assert sigma("data=mme") == authors["mme"] != pore.build_strategy(preset).prior.hyperparameters()["sigma"]
    assert sigma("data=pope_random") == authors["pope"]
    assert sigma("data=mme", "strategy.prior.sigma=1.5") == 1.5
    assert sigma("data=gqa", "strategy.prior.sigma=1.0") == 1.0
    table = ()
    with pytest.raises(ValueError, match=r"no sigma for data.name='spatial' \(it was calibrated on: gqa, "):
        sigma("data=spatial")
    assert sigma("data=spatial", "strategy.prior.sigma=1.0") == 1.0


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_switch_to_the_authors_weight_files(compose: Compose, preset: str, tmp_path: Path) -> None:
    """strategy.prior.name=table strategy.prior.path=FILE: a weight file with the preset's other settings."""
    path = tmp_path / "weight.json"
    path.write_text("[" + ", ".join(["1.0"] * 575 + ["0.5"]) + "]")
    cfg = compose(f"strategy={preset}", "strategy.prior.name=table", f"strategy.prior.path={path}")
    strategy = strategy_from_config(cfg)
    assert strategy.prior.name == "table" and strategy.prior.suppress_padding
    assert strategy.prior.hyperparameters() == {"path": str(path), "resample": False}
    strategy.resolve(ModelFacts("llava", 32, pads_to_square=True))
