import math

import pytest
import torch

from pore.priors import PRIORS, PriorConfig, normalized_position, padding_fraction
from pore.registry import UnknownNameError


def grid(h: int, w: int) -> tuple[torch.Tensor, ...]:
    index = torch.arange(h * w)
    return index // w, index % w, torch.full_like(index, h), torch.full_like(index, w)


def test_row_and_index_positions() -> None:
    row, col, gh, gw = grid(3, 4)
    p_row = normalized_position(row, col, gh, gw, "row")
    assert p_row.tolist() == [0.0] * 4 + [0.5] * 4 + [1.0] * 4
    p_index = normalized_position(row, col, gh, gw, "index")
    assert torch.allclose(p_index, torch.arange(12, dtype=torch.float64) / 11)


def test_single_row_grid_has_position_zero() -> None:
    row, col, gh, gw = grid(1, 5)
    assert normalized_position(row, col, gh, gw, "row").tolist() == [0.0] * 5


def test_prior_values() -> None:
    row, col, gh, gw = grid(5, 2)
    linear = PriorConfig("linear", params={"alpha": 0.4}).weights(row, col, gh, gw)
    expected_rows = [1 - 0.4 * r / 4 for r in range(5)]
    assert torch.allclose(linear, torch.tensor(expected_rows, dtype=torch.float64).repeat_interleave(2))
    exponential = PriorConfig("exponential", params={"sigma": 2.0}, position="index").weights(
        row, col, gh, gw
    )
    assert torch.allclose(exponential, torch.exp(-2.0 * torch.arange(10, dtype=torch.float64) / 9))
    assert PriorConfig("none").weights(row, col, gh, gw).tolist() == [1.0] * 10


@pytest.mark.parametrize("config", [PriorConfig("linear", params={"alpha": 0.9}), PriorConfig("exponential")])
@pytest.mark.parametrize("position", ["row", "index"])
def test_priors_decrease_with_position_and_stay_positive(config: PriorConfig, position: str) -> None:
    row, col, gh, gw = grid(24, 24)
    weights = PriorConfig(config.name, position=position, params=config.params).weights(row, col, gh, gw)
    assert weights[0] == 1.0
    assert bool((weights.diff() <= 0).all())
    assert bool((weights > 0).all())
    if position == "index":
        assert bool((weights.diff() < 0).all())


def test_unused_settings_are_ignored_and_defaults_filled() -> None:
    config = PriorConfig.from_mapping(
        {"name": "exponential", "alpha": 0.3, "sigma": 1.0, "position": "index"}
    )
    assert config.hyperparameters() == {"sigma": 1.0}
    assert PriorConfig("linear").hyperparameters() == {"alpha": 0.6}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (PriorConfig("linear", params={"alpha": 1.0}), r"alpha must be in \[0, 1\)"),
        (PriorConfig("linear", params={"alpha": -0.1}), r"alpha must be in \[0, 1\)"),
        (PriorConfig("linear", params={"alpha": math.nan}), r"alpha must be in \[0, 1\)"),
        (PriorConfig("exponential", params={"sigma": -1}), "sigma must be >= 0"),
        (PriorConfig("linear", position="column"), "valid positions: row, index"),
        (PriorConfig("none", pad_threshold=1.5), r"pad_threshold must be in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters_raise(config: PriorConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_unknown_prior_lists_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="choose one of: calibrated, exponential, linear, none"):
        PriorConfig("quadratic").validate()
    assert set(PRIORS) >= {"none", "linear", "exponential", "calibrated"}


def test_padding_fraction_wide_image() -> None:
    # 200 x 100 (w x h) padded to 200 x 200: rows 0-49 and 150-199 are padding, centred content.
    fraction = padding_fraction(4, 4, image_h=100, image_w=200).view(4, 4)
    assert fraction[0].tolist() == [1.0] * 4  # cells 0-50: all padding
    assert fraction[1].tolist() == [0.0] * 4  # cells 50-100: all content
    assert fraction[2].tolist() == [0.0] * 4
    assert fraction[3].tolist() == [1.0] * 4


def test_padding_fraction_partial_cells_and_square() -> None:
    # 300 x 100 (w x h): content rows 100-200 of 300; 3 cells of 100 px -> middle row content only.
    assert padding_fraction(3, 3, 100, 300).view(3, 3)[:, 0].tolist() == [1.0, 0.0, 1.0]
    # 4 cells of 75 px over content rows 100..200: cell 1 (75-150) is 2/3 content, cell 2 (150-225) 2/3.
    column = padding_fraction(4, 4, 100, 300).view(4, 4)[:, 0]
    assert torch.allclose(column, torch.tensor([1.0, 1 / 3, 1 / 3, 1.0], dtype=torch.float64))
    # A tall image pads columns instead.
    assert padding_fraction(3, 3, 300, 100).view(3, 3)[0].tolist() == [1.0, 0.0, 1.0]
    assert padding_fraction(5, 5, 64, 64).abs().sum() == 0
    with pytest.raises(ValueError, match="positive"):
        padding_fraction(2, 2, 0, 10)
