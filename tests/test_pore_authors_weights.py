"""The PoRe authors' per-benchmark weights of HiMAP and TokenCarve: each preset's prior, resolved for a data
set, keeps the same tokens as the authors' weight file of that benchmark (`../shared/pore_authors/`, read
when present), and the presets carry the authors' settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pore import ModelFacts, build_strategy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "pore_authors"
SIDE = 24  # LLaVA-1.5-7B's grid: the files hold one weight per token of the 24 x 24 raster
# preset -> (folder of the authors' files, {our data name: the authors' file})
CALIBRATED = {
    "pore_authors_himap": (
        "HiMAP",
        {
            "gqa": "gqa.npy",
            "mme": "MME.npy",
            "mmbench": "mmbench.npy",
            "pope": "pope.npy",
            "scienceqa_img": "scienceqa.npy",
            "textvqa": "textvqa.npy",
            "vqav2": "vqav2.npy",
        },
    ),
    "pore_authors_tokencarve": (
        "TokenCarve",
        {
            "gqa": "gqa.npy",
            "mme": "MME.npy",
            "mmbench": "mmbench.npy",
            "pope": "pope.npy",
            "scienceqa_img": "scienceqa.npy",
            "textvqa": "textvqa.npy",
            "vqav2": "vqav2.npy",
        },
    ),
}
CASES = [(preset, data) for preset, (_, files) in CALIBRATED.items() for data in files]


def preset_weights(preset: str, data: str) -> torch.Tensor:
    """(576,) float64 the prior of `preset` resolved for `data`, over the 24 x 24 raster."""
    strategy = build_strategy(preset).resolve(ModelFacts("llava", 32, pads_to_square=True), data=data)
    raster = torch.arange(SIDE * SIDE)
    side = torch.full_like(raster, SIDE)
    return strategy.prior.weights(raster // SIDE, raster % SIDE, side, side).double()


@pytest.mark.parametrize(("preset", "data"), CASES)
def test_the_preset_keeps_what_the_authors_file_keeps(preset: str, data: str) -> None:
    """Kept-set agreement 1.0 on 200 random score vectors, at the preset's budgets and at 96 / 64 / 16 (96:
    TokenCarve's attention ranking runs over 1.5 x 64)."""
    folder, files = CALIBRATED[preset]
    path = SHARED / folder / files[data]
    if not path.is_file():
        pytest.skip(f"{path} is absent (the authors' files are not committed; /work/shared/README.md)")
    authors = torch.from_numpy(np.load(path))  # (576,) float64
    ours = preset_weights(preset, data)
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(200, SIDE * SIDE, generator=generator, dtype=torch.float64)  # (200, 576)
    keep = build_strategy(preset).keep
    budgets = {*(keep if isinstance(keep, tuple) else (keep,)), 96, 64, 16}
    for keep in budgets:
        expected = (scores * authors).topk(keep, dim=1).indices.sort(dim=1).values
        kept = (scores * ours).topk(keep, dim=1).indices.sort(dim=1).values
        assert torch.equal(kept, expected), f"{preset} on {data}: keep={keep} differs from {path.name}"
    assert float((ours - authors).abs().max()) < 1e-9


def test_himap_preset_is_the_authors_setting() -> None:
    strategy = build_strategy("pore_authors_himap")
    assert (strategy.method, strategy.layer, strategy.keep, strategy.ratio) == (
        "himap",
        (2, 8),
        (115, 90),
        None,
    )
    assert [stage.reweight for stage in strategy.stages()] == [True, False]  # img2txt only
    prior = strategy.prior
    assert (prior.name, prior.position, prior.suppress_padding, prior.pad_threshold) == (
        "exponential",
        "index",
        True,
        0.5,
    )
    assert not prior.budget_from_unpadded  # topk(TXT_ATTN_RANK) of the masked scores: no budget cut
    # A benchmark the authors did not calibrate is refused in one line; a sigma typed runs it.
    facts = ModelFacts("llava", 32, pads_to_square=True)
    with pytest.raises(ValueError, match=r"no sigma for data.name='spatial'.*strategy.prior.sigma=<value>"):
        strategy.resolve(facts, data="spatial")
    typed = build_strategy("pore_authors_himap", prior={"sigma": 1.073}).resolve(facts, data="spatial")
    assert typed.prior.hyperparameters() == {"sigma": 1.073}


def test_tokencarve_preset_is_the_authors_setting() -> None:
    strategy = build_strategy("pore_authors_tokencarve")
    assert (strategy.method, strategy.layer, strategy.keep, strategy.ratio) == ("tokencarve", 2, 64, None)
    assert strategy.options == {"mode": "fused", "av_weight": 0.5, "merge": True}  # --token-carve-SV-AV-*
    prior = strategy.prior
    assert (prior.name, prior.position, prior.suppress_padding, prior.pad_threshold) == (
        "exponential",
        "index",
        True,
        0.5,
    )
    assert not prior.budget_from_unpadded
    # A benchmark the authors did not calibrate is refused in one line; a sigma typed runs it.
    facts = ModelFacts("llava", 32, pads_to_square=True)
    with pytest.raises(ValueError, match=r"no sigma for data.name='spatial'.*strategy.prior.sigma=<value>"):
        strategy.resolve(facts, data="spatial")
    typed = build_strategy("pore_authors_tokencarve", prior={"sigma": 0.813}).resolve(facts, data="spatial")
    assert typed.prior.hyperparameters() == {"sigma": 0.813}
