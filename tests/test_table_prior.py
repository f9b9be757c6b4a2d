"""The `table` prior: weights read from a .npy / .json file, used as given, against hand-written values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pore import build_strategy
from pore.priors import PriorConfig


def grid(h: int, w: int) -> tuple[torch.Tensor, ...]:
    index = torch.arange(h * w)
    return index // w, index % w, torch.full_like(index, h), torch.full_like(index, w)


def table(path: Path, **settings: object) -> PriorConfig:
    return PriorConfig.from_mapping({"name": "table", "path": str(path), **settings})


def test_a_vector_is_read_over_the_raster_index(tmp_path: Path) -> None:
    """A 6-entry vector on a 2 x 3 grid: token (r, c) gets entry 3 r + c, exactly as written."""
    values = [1.0, 0.9, 0.7, 0.5, 0.25, 0.0]
    path = tmp_path / "curve.npy"
    np.save(path, np.array(values))
    weights = table(path).weights(*grid(2, 3))
    assert weights.dtype == torch.float64
    assert weights.tolist() == values
    # Tokens in any order (as the engine passes them): each gets its own cell.
    row, col = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 0])
    sizes = torch.full((3,), 2), torch.full((3,), 3)
    assert table(path).weights(row, col, *sizes).tolist() == [0.0, 1.0, 0.5]


def test_a_grid_is_read_by_row_and_column(tmp_path: Path) -> None:
    """A 3 x 2 JSON grid (list of rows, or {"weights": ...} with notes) on a 3 x 2 image grid."""
    rows = [[3.0, 2.0], [1.5, 1.0], [0.5, 0.25]]
    plain, annotated = tmp_path / "grid.json", tmp_path / "annotated.json"
    plain.write_text(json.dumps(rows))
    annotated.write_text(json.dumps({"source": "by hand", "weights": rows}))
    expected = [3.0, 2.0, 1.5, 1.0, 0.5, 0.25]
    assert table(plain).weights(*grid(3, 2)).tolist() == expected
    assert table(annotated).weights(*grid(3, 2)).tolist() == expected


def test_one_token_grids_get_weight_one(tmp_path: Path) -> None:
    """A grid of one token has nothing to rank (and is what PriorConfig.validate evaluates)."""
    path = tmp_path / "curve.json"
    path.write_text(json.dumps([1.0, 0.5, 0.25, 0.125]))
    assert table(path).weights(*grid(1, 1)).tolist() == [1.0]
    table(path).validate()


def test_another_grid_size_is_refused_with_both_shapes(tmp_path: Path) -> None:
    vector, square = tmp_path / "curve.npy", tmp_path / "square.npy"
    np.save(vector, np.linspace(1.0, 0.4, 576))
    np.save(square, np.ones((24, 24)))
    with pytest.raises(ValueError) as caught:
        table(vector).weights(*grid(8, 8))
    assert str(caught.value) == (
        f"weight table {vector.resolve()} is a vector of 576 weights over the raster index, but this image's "
        "grid is 8 x 8 (64 tokens): give a table of 64 entries or a 8 x 8 grid, or set "
        "strategy.prior.resample=true to resample it over normalised positions"
    )
    with pytest.raises(
        ValueError, match=r"is a 24 x 24 grid, but this image's grid is 12 x 48 \(576 tokens\)"
    ):
        table(square).weights(*grid(12, 48))


def test_resampling_a_vector_is_linear_over_the_normalised_index(tmp_path: Path) -> None:
    """5 entries at p = 0, 1/4, ..., 1 onto 3 tokens at p = 0, 1/2, 1; onto 9 at p = k / 8 (midpoints)."""
    path = tmp_path / "curve.json"
    path.write_text(json.dumps([1.0, 0.8, 0.4, 0.2, 0.0]))
    assert table(path, resample=True).weights(*grid(1, 3)).tolist() == pytest.approx([1.0, 0.4, 0.0])
    nine = table(path, resample=True).weights(*grid(3, 3)).tolist()
    assert nine == pytest.approx([1.0, 0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0])


def test_resampling_a_grid_is_bilinear_over_normalised_rows_and_columns(tmp_path: Path) -> None:
    """A 2 x 2 grid onto 3 x 3: corners stay, edges are the means of their two corners, the centre of four."""
    path = tmp_path / "grid.npy"
    np.save(path, np.array([[4.0, 2.0], [0.0, 1.0]]))
    weights = table(path, resample=True).weights(*grid(3, 3)).tolist()
    assert weights == pytest.approx([4.0, 3.0, 2.0, 2.0, 1.75, 1.5, 0.0, 0.5, 1.0])
    # Not renormalised: the values stay in the file's units (base and high-resolution grids stay comparable).
    assert table(path, resample=True).weights(*grid(2, 2)).tolist() == [4.0, 2.0, 0.0, 1.0]


def test_the_command_line_string_for_resample_is_a_flag(tmp_path: Path) -> None:
    path = tmp_path / "curve.json"
    path.write_text(json.dumps([1.0, 0.0]))
    assert table(path, resample="true").hyperparameters() == {"path": str(path), "resample": True}
    with pytest.raises(ValueError, match="resample=true"):
        table(path, resample="false").weights(*grid(1, 3))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "[1.0, 0.5,", r"weight table .*bad\.json is not valid JSON: "),
        (
            "ragged.json",
            "[[1.0, 0.5], [1.0]]",
            r"is not a vector or a grid of numbers \(rows of unequal length",
        ),
        ("cube.json", "[[[1.0]]]", r"has shape \(1, 1, 1\); expected a non-empty vector"),
        ("empty.json", "[]", r"has shape \(0,\); expected a non-empty vector"),
        ("object.json", '{"values": [1.0]}', r"is a JSON object without a 'weights' key"),
        (
            "negative.json",
            "[1.0, 0.5, -0.25, 0.1]",
            r"has negative weights \(smallest -0\.25, first at index \(2,\)\)",
        ),
        ("nan.json", "[1.0, NaN]", r"has non-finite weights \(first at index \(1,\)\)"),
        (
            "calibrated.json",
            '{"format": "pore-prior/1"}',
            r"is a calibrated prior file .*prior\.name=calibrated",
        ),
        ("curve.csv", "1.0,0.5", r"has an unknown file type '\.csv'; use \.npy or \.json"),
        ("broken.npy", "not an array", r"cannot read weight table .*broken\.npy as a \.npy array"),
    ],
)
def test_bad_files_are_one_clear_error_naming_the_file(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        table(path).validate()


def test_missing_file_and_missing_path() -> None:
    with pytest.raises(
        FileNotFoundError, match=r"weight table '/nowhere/w\.npy' not found \(strategy\.prior\.path\)"
    ):
        PriorConfig.from_mapping({"name": "table", "path": "/nowhere/w.npy"}).validate()
    with pytest.raises(ValueError, match=r"the table prior needs strategy\.prior\.path"):
        PriorConfig("table").validate()


def test_a_rewritten_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "curve.json"
    path.write_text(json.dumps([1.0, 0.5]))
    assert table(path).weights(*grid(1, 2)).tolist() == [1.0, 0.5]
    path.write_text(json.dumps([0.25, 1.0, 0.0][:2]))
    assert table(path).weights(*grid(1, 2)).tolist() == [0.25, 1.0]


def test_the_authors_exponential_as_a_table_equals_the_exponential_prior(tmp_path: Path) -> None:
    """A 576-entry file of exp(-sigma i / 575) ranks exactly like prior.name=exponential position=index."""
    sigma = 1.915
    path = tmp_path / "pdrop_like.npy"
    np.save(path, np.array([math.exp(-sigma * i / 575) for i in range(576)]))
    from_file = table(path).weights(*grid(24, 24))
    exponential = PriorConfig("exponential", position="index", params={"sigma": sigma}).weights(*grid(24, 24))
    torch.testing.assert_close(from_file, exponential, rtol=1e-12, atol=0)
    strategy = build_strategy("fastv", prior={"name": "table", "path": str(path)})
    assert strategy.prior.hyperparameters() == {"path": str(path), "resample": False}


def test_grids_of_two_sizes_in_one_call(tmp_path: Path) -> None:
    """LLaVA-NeXT's layout: a base grid the file fits (2 x 3, as is) and a high-resolution grid of another
    size (3 x 3, resampled over the normalised index) weighted in one call, in the file's units."""
    path = tmp_path / "curve.json"
    path.write_text(json.dumps([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    base, high = grid(2, 3), grid(3, 3)
    row, col, grid_h, grid_w = (torch.cat([a, b]) for a, b in zip(base, high, strict=True))
    weights = table(path, resample=True).weights(row, col, grid_h, grid_w).tolist()
    # 9 tokens at p = k / 8 on the 6-entry curve 1 - p: 1 - k / 8.
    assert weights == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0] + [1 - k / 8 for k in range(9)])
    with pytest.raises(ValueError, match=r"but this image's grid is 3 x 3 \(9 tokens\)"):
        table(path).weights(row, col, grid_h, grid_w)
