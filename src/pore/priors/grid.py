"""Per-grid weight tables: resampling a table to another grid size, and reading each token's weight."""

from __future__ import annotations

from collections.abc import Callable

import torch


def resample(table: torch.Tensor, grid_h: int, grid_w: int, renormalise: bool = True) -> torch.Tensor:
    """Bilinear resampling of an (h, w) table to (grid_h, grid_w) on normalised coordinates.

    Cell centres are placed at r / (h - 1) and r / (grid_h - 1) (`align_corners=True`): the corner cells of
    both grids coincide, so the top row stays the top row. Renormalised to mean 1 unless `renormalise=False`
    (then the values stay in the table's own units, so grids resampled from one table stay comparable).
    """
    if tuple(table.shape) == (grid_h, grid_w):
        return table
    resampled = torch.nn.functional.interpolate(
        table[None, None].double(), size=(grid_h, grid_w), mode="bilinear", align_corners=True
    )[0, 0]
    if not renormalise:
        return resampled
    return resampled / resampled.mean().clamp(min=1e-12)


def gather_tables(
    row: torch.Tensor,
    col: torch.Tensor,
    grid_h: torch.Tensor,
    grid_w: torch.Tensor,
    table_for: Callable[[int, int], torch.Tensor],
) -> torch.Tensor:
    """Each token's weight (float64, shape of `row`), read from `table_for(H, W)`: its grid's (H, W) table.

    Tokens of one batch may belong to grids of different sizes; each size's table is built once.
    """
    weights = torch.empty(row.shape, dtype=torch.float64)
    if row.numel() == 0:
        return weights.to(row.device)
    sizes = torch.stack([grid_h.reshape(-1), grid_w.reshape(-1)], dim=1).cpu()  # (T, 2)
    flat_row, flat_col = row.reshape(-1).cpu(), col.reshape(-1).cpu()
    flat = weights.view(-1)
    for h, w in torch.unique(sizes, dim=0).tolist():
        table = table_for(int(h), int(w))  # (h, w)
        here = (sizes[:, 0] == h) & (sizes[:, 1] == w)
        rows, cols = flat_row[here].clamp(0, h - 1), flat_col[here].clamp(0, w - 1)
        flat[here] = table[rows, cols]
    return weights.to(row.device)
