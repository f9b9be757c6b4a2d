"""Weight tables for the `table` prior: a file of weights, one per image token, used as the prior as it is.

This is how the PoRe authors ship their debiasing curves (`playground/data/weight/<method>/<benchmark>.npy` in
intcomp/attention-bias: 576 weights over the raster index of LLaVA-1.5's 24 x 24 grid, multiplied into the
attention scores), so a table prior runs their files unchanged:
`strategy.prior.name=table strategy.prior.path=<clone>/playground/data/weight/FastV/weight.npy`.

A file holds either

- a vector of N weights over the raster index i = row * W + col (N = H * W of the image grid), or
- an H x W grid of weights, row 0 = the top of the image;

as `.npy` (a 1-D or 2-D array) or `.json` (a list, a list of rows, or an object whose `weights` is one of
those; other keys such as `source` are free-form notes). Weights must be finite and >= 0; their scale does not
matter for the top-k inside an image.

On a grid of another size (LLaVA-NeXT's high-resolution grid, Qwen2-VL's dynamic grids, the embedded 8 x 8
model) the table is refused by default, with both shapes in the message: a table is a measurement of one
model's grid, and stretching it silently changes the experiment. `resample=true` fits it instead, on
normalised positions, the way the table was indexed: a vector by linear interpolation over p = i / (N - 1)
(the first and last tokens keep the first and last weights), a grid by bilinear interpolation over
(row / (H - 1), col / (W - 1)) (the corner cells coincide). Resampled values are not renormalised, so grids
of one image fitted from one table (LLaVA-NeXT's base and high-resolution views) stay comparable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pore.priors.base import PRIORS
from pore.priors.calibrated import FORMAT as CALIBRATED_FORMAT
from pore.priors.grid import gather_tables
from pore.priors.grid import resample as resample_grid

SUFFIXES: tuple[str, ...] = (".npy", ".json")


@dataclass(frozen=True)
class WeightTable:
    """The weights of one file: a (N,) vector over the raster index or an (H, W) grid, float64."""

    path: Path
    weights: torch.Tensor

    @property
    def is_vector(self) -> bool:
        return self.weights.dim() == 1

    def describe(self) -> str:
        if self.is_vector:
            return f"a vector of {self.weights.numel()} weights over the raster index"
        return f"a {self.weights.shape[0]} x {self.weights.shape[1]} grid"

    def on_grid(self, grid_h: int, grid_w: int, resample: bool = False) -> torch.Tensor:
        """(grid_h, grid_w) weights for an image grid of that size; another size needs `resample`."""
        tokens = grid_h * grid_w
        if self.is_vector and self.weights.numel() == tokens:
            return self.weights.view(grid_h, grid_w)
        if not self.is_vector and tuple(self.weights.shape) == (grid_h, grid_w):
            return self.weights
        if not resample:
            raise ValueError(
                f"weight table {self.path} is {self.describe()}, but this image's grid is "
                f"{grid_h} x {grid_w} ({tokens} tokens): give a table of {tokens} entries or a {grid_h} x "
                f"{grid_w} grid, or set strategy.prior.resample=true to resample it over normalised positions"
            )
        if self.is_vector:
            # Linear over the normalised raster index: a (1, N) table resampled to (1, tokens).
            line = resample_grid(self.weights[None, :], 1, tokens, renormalise=False)
            return line.reshape(grid_h, grid_w)
        return resample_grid(self.weights, grid_h, grid_w, renormalise=False)


def _read(path: Path) -> object:
    """The raw values of a `.npy` or `.json` file, or a one-line error naming the file."""
    if path.suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"cannot read weight table {path} as a .npy array: {error}") from error
        if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"weight table {path} does not hold a numeric array (dtype {array.dtype})")
        return array.astype(np.float64).tolist()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"weight table {path} is not valid JSON: {error}") from error
    if isinstance(data, dict):
        if data.get("format") == CALIBRATED_FORMAT:
            raise ValueError(
                f"{path} is a calibrated prior file ({CALIBRATED_FORMAT}); use strategy.prior.name=calibrated"
            )
        if "weights" not in data:
            raise ValueError(
                f"weight table {path} is a JSON object without a 'weights' key; write the weights as a list, "
                'a list of rows, or {"weights": [...]}'
            )
        data = data["weights"]
    return data


def parse_table(values: object, path: Path) -> WeightTable:
    """Check values read from `path`: a non-empty vector or grid of finite weights >= 0."""
    try:
        weights = torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"weight table {path} is not a vector or a grid of numbers (rows of unequal length?): {error}"
        ) from error
    if weights.dim() not in (1, 2) or weights.numel() == 0:
        raise ValueError(
            f"weight table {path} has shape {tuple(weights.shape)}; expected a non-empty vector (N,) over "
            "the raster index or a grid (H, W)"
        )
    bad = ~torch.isfinite(weights)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight table {path} has non-finite weights (first at index {where}); fix the file")
    if bool((weights < 0).any()):
        where = tuple(int(i) for i in (weights < 0).nonzero()[0])
        raise ValueError(
            f"weight table {path} has negative weights (smallest {weights.min().item():g}, first at index "
            f"{where}); weights must be >= 0"
        )
    return WeightTable(path, weights)


# Loaded files by (path, modification time, size): a rewritten file is read again.
_TABLES: dict[tuple[str, int, int], WeightTable] = {}


def load_table(path: str | os.PathLike | None) -> WeightTable:
    """Read (once; cached while the file is unchanged) the weight table at `path`."""
    if not path:
        raise ValueError(
            "the table prior needs strategy.prior.path: a .npy or .json file of weights (a vector over the "
            "raster index, or an H x W grid)"
        )
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"weight table {str(path)!r} not found (strategy.prior.path)")
    if resolved.suffix not in SUFFIXES:
        raise ValueError(
            f"weight table {resolved} has an unknown file type {resolved.suffix!r}; "
            f"use {' or '.join(SUFFIXES)}"
        )
    resolved = resolved.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key not in _TABLES:
        _TABLES[key] = parse_table(_read(resolved), resolved)
    return _TABLES[key]


@PRIORS.register("table")
def table_prior(
    row: torch.Tensor,
    col: torch.Tensor,
    grid_h: torch.Tensor,
    grid_w: torch.Tensor,
    path: str | None = None,
    resample: bool = False,
) -> torch.Tensor:
    """w read from a weight file (`.npy` / `.json`): a vector over the raster index or an H x W grid.

    Runs published weight files unchanged (the PoRe authors' `weight.npy` curves; see `pore.priors.table`).
    The weights are used as given (no rescaling). A grid of another size than the file's is refused with
    both shapes in the message, unless `resample` (then: linear over the normalised raster index for a
    vector, bilinear over normalised rows and columns for a grid). A one-token grid has nothing to rank and
    gets weight 1 (the file is still read and checked).
    """
    table = load_table(path)

    def on_grid(h: int, w: int) -> torch.Tensor:
        return torch.ones(1, 1, dtype=torch.float64) if h * w == 1 else table.on_grid(h, w, resample)

    return gather_tables(row, col, grid_h, grid_w, on_grid)
