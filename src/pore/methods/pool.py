"""Spatial pooling: keep a uniform sub-grid of each image, ignoring attention (the baseline to beat).

For a budget of k tokens of an H x W grid, the grid is cut into gh x gw windows with gh * gw = k (the
factorisation whose shape is closest to the grid's, so windows stay near square; 64 of 24 x 24 gives 8 x 8
windows of 3 x 3), window i spanning rows [floor(i H / gh), floor((i + 1) H / gh)). Each window keeps one
token, the one at its centre:

- `mode=subsample` (default): the centre token passes on unchanged (uniform subsampling);
- `mode=average`: the centre token carries the mean hidden state of its whole window (average pooling of
  the LLM's input at layer K, the same budget and positions).

If no factorisation fits the grid (k > H or W for a prime k), the k tokens are spread evenly in raster
order instead. Images made of several grids (LLaVA-NeXT's base image and high-resolution grid) share the
budget in proportion to their token counts (grids told apart by `VisualLayout.part`). The prior has no
effect on the choice (every window keeps its own token).
"""

from __future__ import annotations

import math

import torch

from pore.methods.base import METHODS, PruningMethod, ScoringInputs

MODES = ("subsample", "average")


def window_grid(height: int, width: int, budget: int) -> tuple[int, int] | None:
    """(gh, gw) with gh * gw == budget, gh <= height, gw <= width, shape closest to height / width."""
    best, best_distance = None, math.inf
    for gh in range(1, budget + 1):
        if budget % gh:
            continue
        gw = budget // gh
        if gh > height or gw > width:
            continue
        distance = abs(math.log(gh / gw) - math.log(height / width))
        if distance < best_distance:
            best, best_distance = (gh, gw), distance
    return best


def window_of_cells(height: int, width: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H * W,) window id of each cell in raster order, and (budget,) raster index of each window centre."""
    grid = window_grid(height, width, budget)
    if grid is None:  # spread evenly in raster order; each token is its own window
        centres = torch.linspace(0, height * width - 1, budget).round().long()
        window = torch.full((height * width,), -1, dtype=torch.long)
        window[centres] = torch.arange(budget)
        return window, centres
    gh, gw = grid
    row_band = torch.arange(height) * gh // height  # (H,) band of each row
    col_band = torch.arange(width) * gw // width  # (W,)
    window = (row_band[:, None] * gw + col_band[None, :]).reshape(-1)  # (H * W,)
    # Centre of band i: the middle of rows [ceil(i H / gh), ceil((i + 1) H / gh)).
    starts_r = [(-(-i * height // gh)) for i in range(gh + 1)]
    starts_c = [(-(-i * width // gw)) for i in range(gw + 1)]
    centre_r = torch.tensor([(starts_r[i] + starts_r[i + 1] - 1) // 2 for i in range(gh)])
    centre_c = torch.tensor([(starts_c[i] + starts_c[i + 1] - 1) // 2 for i in range(gw)])
    centres = (centre_r[:, None] * width + centre_c[None, :]).reshape(-1)  # (budget,)
    return window, centres


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Largest-remainder split of `budget` in proportion to `sizes` (each part gets at least one)."""
    total = sum(sizes)
    shares = [budget * size / total for size in sizes]
    parts = [max(1, math.floor(share)) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    for i in by_remainder[: max(0, budget - sum(parts))]:
        parts[i] += 1
    return parts


@METHODS.register("pool")
class SpatialPool(PruningMethod):
    def __init__(self, seed: int = 0, mode: str = "subsample") -> None:
        super().__init__(seed)
        if mode not in MODES:
            raise ValueError(f"pool: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        self.mode = mode

    def _windows(self, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) window id of each token (-1: none; unique per sample), (B, N) bool: the window centres."""
        layout = inputs.layout
        candidates = inputs.candidates().cpu()
        image, rows, cols = layout.image_index.cpu(), layout.row.cpu(), layout.col.cpu()
        grid_h, grid_w, part = layout.grid_h.cpu(), layout.grid_w.cpu(), layout.grid_part.cpu()
        prunable = (layout.valid & layout.prunable).cpu()
        window = torch.full(layout.seq_index.shape, -1, dtype=torch.long)
        centre = torch.zeros(layout.seq_index.shape, dtype=torch.bool)
        for b in range(window.shape[0]):
            next_window = 0
            for i in image[b][prunable[b]].unique().tolist():
                in_image = prunable[b] & (image[b] == i)
                parts = part[b][in_image].unique().tolist()
                sizes = [int((in_image & (part[b] == p)).sum()) for p in parts]
                budgets = split_budget(inputs.budget(int(in_image.sum())), sizes)
                for p, part_budget in zip(parts, budgets, strict=True):
                    tokens = (in_image & (part[b] == p)).nonzero()[:, 0]  # slots of this grid
                    h, w = int(grid_h[b, tokens[0]]), int(grid_w[b, tokens[0]])
                    cell_window, centres = window_of_cells(h, w, min(part_budget, h * w))
                    raster = rows[b, tokens] * w + cols[b, tokens]
                    window[b, tokens] = torch.where(
                        cell_window[raster] >= 0, cell_window[raster] + next_window, -1
                    )
                    centre[b, tokens] = torch.isin(raster, centres)
                    next_window += len(centres)
        device = layout.seq_index.device
        return window.to(device), (centre & candidates).to(device)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        _, centre = self._windows(inputs)
        return centre.double()  # (B, N): the top-k of each image are exactly its window centres

    def merge(self, inputs: ScoringInputs, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        if self.mode != "average":
            return hidden
        layout = inputs.layout
        window, centre = self._windows(inputs)
        members = inputs.candidates() & (window >= 0)  # (B, N)
        pooled = hidden.clone()
        for b in range(hidden.shape[0]):
            slots = members[b].nonzero()[:, 0]
            ids = window[b, slots]  # (S,)
            n_windows = int(ids.max()) + 1 if ids.numel() else 0
            total = hidden.new_zeros(n_windows, hidden.shape[-1], dtype=torch.float32)
            total.index_add_(0, ids, hidden[b, layout.seq_index[b, slots]].float())
            count = torch.bincount(ids, minlength=n_windows).clamp(min=1)
            centres = (centre[b] & kept[b]).nonzero()[:, 0]
            mean = total / count[:, None]
            pooled[b, layout.seq_index[b, centres]] = mean[window[b, centres]].to(hidden.dtype)
        return pooled
