import pytest

from pore import STRATEGIES, Strategy, UnknownNameError, build_strategy


def test_predefined_strategies() -> None:
    assert set(STRATEGIES) == {"none", "fastv", "pore_linear", "pore_exponential", "random"}
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
    with pytest.raises(UnknownNameError, match="choose one of: fastv, none, pore_exponential"):
        build_strategy("fastvv")
    with pytest.raises(UnknownNameError, match="choose one of: fastv, none, random"):
        Strategy(method="sparse").validate()
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
        build_strategy("fastv", **settings).validate(num_layers=32)
