import pytest

from pore import Strategy, UnknownNameError, build_strategy, presets
from pore.adapters import ModelFacts


def test_predefined_strategies() -> None:
    assert {"none", "fastv", "pore_linear", "pore_exponential", "random"} <= set(presets.names())
    for method in ("pdrop", "sparsevlm"):
        for form in ("linear", "exponential"):
            strategy = build_strategy(f"pore_{method}_{form}")
            assert (strategy.method, strategy.prior.name) == (method, form)
    assert build_strategy("pool_average").options == {"mode": "average"}
    assert build_strategy("pore_linear").method == "fastv"
    assert build_strategy("pore_linear").prior.name == "linear"
    assert build_strategy("pore_exponential").prior.name == "exponential"
    assert not build_strategy("none").prunes


def test_overrides_use_the_config_key_names() -> None:
    strategy = build_strategy("pore_linear", keep=64, layer=3, prior={"alpha": 0.2, "position": "index"})
    assert (strategy.keep, strategy.layer) == (64, 3)
    assert strategy.prior.hyperparameters() == {"alpha": 0.2}
    assert strategy.prior.position == "index"
    nested = Strategy.from_mapping(
        {"name": "mine", "method": "fastv", "keep": 8, "prior": {"name": "exponential", "sigma": 2.0}}
    )
    assert nested.prior.hyperparameters() == {"sigma": 2.0}


def test_budget_keep_wins_over_ratio() -> None:
    assert Strategy(method="fastv", keep=64, ratio=0.5).budget(576) == 64
    assert Strategy(method="fastv", ratio=0.25).budget(576) == 144
    assert Strategy(method="fastv", ratio=0.001).budget(576) == 1


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(
        UnknownNameError,
        # Sorted by name; the names before fastervlm (cdpruner, dart, divprune, ...) grow with the methods.
        match=r"choose one of: ([a-z_0-9]+, )*fastervlm, fastv, himap, none, pdrop, pool, pool_average, "
        r"pore_",
    ):
        build_strategy("fastvv")
    with pytest.raises(
        UnknownNameError,
        match=r"choose one of: ([a-z_0-9]+, )*fastervlm, fastv, himap, none, pdrop, pool, prumerge, random, "
        r"sparsevlm",
    ):
        Strategy(method="sparse").resolve()
    with pytest.raises(ValueError, match="unknown strategy settings"):
        Strategy.from_mapping({"method": "fastv", "kep": 3})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keep": 0}, "keep must be a positive integer"),
        ({"keep": 2.5}, "keep must be a positive integer"),
        ({"keep": None, "ratio": 1.5}, r"ratio must be in \(0, 1\]"),
        ({"keep": None, "ratio": None}, "set strategy.keep"),
        ({"layer": 0}, r"layer must be in \[1, 31\]"),
        ({"layer": 32}, r"layer must be in \[1, 31\]"),
    ],
)
def test_bad_settings_raise(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_strategy("fastv", **settings).resolve(ModelFacts("llava", 32, pads_to_square=True))


def test_stages_from_lists() -> None:
    pdrop = build_strategy("pdrop")
    stages = pdrop.resolve(ModelFacts("llava", 32, pads_to_square=True)).stages()
    assert [(s.layer, s.ratio, s.reweight) for s in stages] == [
        (8, 0.5, True),
        (16, 0.25, True),
        (24, 0.125, True),
    ]
    assert [s.budget(576) for s in stages] == [288, 144, 72]
    first_only = build_strategy("pore_pdrop_linear", reweight="first").stages()
    assert [s.reweight for s in first_only] == [True, False, False]
    shared_keep = build_strategy("pdrop", keep=64, ratio=None, layer=[2, 3]).stages()
    assert [(s.layer, s.budget(576)) for s in shared_keep] == [(2, 64), (3, 64)]
    # Lists from YAML become tuples, so strategies stay immutable.
    assert Strategy.from_mapping({"method": "pdrop", "layer": [1, 2], "ratio": [0.5, 0.25]}).layer == (1, 2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layer": [8, 8], "ratio": [0.5, 0.25]}, "increasing layers"),
        ({"layer": [8, 16], "ratio": [0.5, 0.25, 0.1]}, "3 values but strategy.layer names 2 stages"),
        ({"layer": [8, 40], "ratio": [0.5, 0.25]}, r"layer must be in \[1, 31\]"),
        ({"layer": [8, 16], "ratio": [0.5, 0.0]}, r"ratio must be in \(0, 1\]"),
        ({"reweight": "last"}, "reweight must be 'all' or 'first'"),
        ({"options": {"mode": "max"}}, r"unknown strategy.options \['mode'\].*valid options: score_from"),
    ],
)
def test_bad_stage_settings_raise(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_strategy("pdrop", **settings).resolve(ModelFacts("llava", 32, pads_to_square=True))


def test_method_options_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"unknown strategy.options \['merg'\].*valid options: raters, recycle, merge"
    ):
        build_strategy("sparsevlm", options={"merg": True}).resolve()
    build_strategy("sparsevlm", options={"merge": True}).resolve()
