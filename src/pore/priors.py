"""Reweighting priors: pure functions from a visual token's place in its image grid to a weight.

PoRe multiplies each image token's attention score by `w(p)`, where `p` in [0, 1] is the token's normalised
position in raster order (by row, or by raster index). Causal LMs pay inflated attention to late tokens,
so a prior that decreases with `p` counteracts that recency bias before the top-k.

Adding a prior is one decorated function here (and one config file): its keyword parameters become the
strategy's `prior.<name>` settings.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from pore.registry import Registry

PositionMode = Literal["row", "index"]
POSITION_MODES: tuple[str, ...] = ("row", "index")

PriorFunction = Callable[..., torch.Tensor]
PRIORS: Registry[PriorFunction] = Registry("prior")


def normalized_position(
    row: torch.Tensor,
    col: torch.Tensor,
    grid_h: torch.Tensor,
    grid_w: torch.Tensor,
    mode: str = "row",
) -> torch.Tensor:
    """Position p in [0, 1] of each token in its image grid.

    `row`: p = row / (H - 1); `index`: p = i / (N - 1) with raster index i = row * W + col and N = H * W.
    All arguments are integer tensors of one shape (the grid size is given per token so that images of
    different sizes can share a batch). A grid of one row (or one token) gives p = 0.
    """
    if mode == "row":
        numerator, denominator = row, grid_h - 1
    elif mode == "index":
        numerator, denominator = row * grid_w + col, grid_h * grid_w - 1
    else:
        raise ValueError(f"unknown prior position {mode!r}; valid positions: {', '.join(POSITION_MODES)}")
    return numerator.double() / denominator.clamp(min=1).double()


@PRIORS.register("none")
def none_prior(p: torch.Tensor) -> torch.Tensor:
    """w = 1: plain attention ranking (FastV)."""
    return torch.ones_like(p)


@PRIORS.register("linear")
def linear_prior(p: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """w = 1 - alpha * p, alpha in [0, 1), so every weight stays positive."""
    if not 0.0 <= alpha < 1.0 or math.isnan(alpha):
        raise ValueError(f"linear prior: alpha must be in [0, 1), got {alpha}")
    return 1.0 - alpha * p


@PRIORS.register("exponential")
def exponential_prior(p: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """w = exp(-sigma * p), sigma >= 0 (the form the PoRe authors fitted per method and benchmark)."""
    if not sigma >= 0.0:  # also rejects NaN
        raise ValueError(f"exponential prior: sigma must be >= 0, got {sigma}")
    return torch.exp(-sigma * p)


def padding_fraction(grid_h: int, grid_w: int, image_h: int, image_w: int) -> torch.Tensor:
    """Share of each grid cell's area that lies in the pad-to-square border, shape (grid_h * grid_w,).

    LLaVA-1.5 pads a non-square image to a square of side max(h, w), pasting it centred (offset
    (side - size) // 2, as `expand2square` does), then resizes the square to the encoder's input. Cell (r, c)
    of the token grid covers [r, r + 1) * side / grid_h by [c, c + 1) * side / grid_w of that square.
    """
    if image_h <= 0 or image_w <= 0:
        raise ValueError(f"image size must be positive, got {image_h} x {image_w}")
    side = max(image_h, image_w)
    top, left = (side - image_h) // 2, (side - image_w) // 2

    def content_share(cells: int, start: int, length: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64) * side / cells
        low, high = edges[:-1], edges[1:]
        overlap = torch.minimum(high, torch.tensor(float(start + length))) - torch.maximum(
            low, torch.tensor(float(start))
        )
        return overlap.clamp(min=0) / (high - low)

    rows = content_share(grid_h, top, image_h)  # (grid_h,)
    cols = content_share(grid_w, left, image_w)  # (grid_w,)
    return (1.0 - rows[:, None] * cols[None, :]).reshape(-1)


@dataclass(frozen=True)
class PriorConfig:
    """A prior and its settings, as users write them under `strategy.prior`.

    `params` holds the prior function's own hyperparameters (`alpha`, `sigma`, ...); settings a prior does not
    take are ignored, so one sweep can vary `alpha` and `sigma` across strategies that use either.
    """

    name: str = "none"
    position: str = "row"
    suppress_padding: bool = False
    pad_threshold: float = 0.5
    params: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> PriorConfig:
        """Build from a flat mapping such as `{"name": "linear", "alpha": 0.3, "position": "row"}`."""
        structural = {f.name for f in fields(cls)} - {"params"}
        known = {key: value for key, value in settings.items() if key in structural}
        params = {
            key: value for key, value in settings.items() if key not in structural and value is not None
        }
        return cls(**known, params=params)

    def hyperparameters(self) -> dict[str, float]:
        """The settings that this prior's function takes, with the function's defaults filled in."""
        signature = inspect.signature(PRIORS.get(self.name)).parameters
        return {
            key: float(self.params.get(key, parameter.default))
            for key, parameter in list(signature.items())[1:]
        }

    def validate(self) -> None:
        PRIORS.get(self.name)
        if self.position not in POSITION_MODES:
            raise ValueError(
                f"unknown prior position {self.position!r}; valid positions: {', '.join(POSITION_MODES)}"
            )
        if not 0.0 <= self.pad_threshold < 1.0:
            raise ValueError(f"prior pad_threshold must be in [0, 1), got {self.pad_threshold}")
        # Evaluating the prior once checks its hyperparameters with the prior's own message.
        one = torch.ones(1, dtype=torch.long)
        self.weights(one - 1, one - 1, one, one)

    def weights(
        self,
        row: torch.Tensor,
        col: torch.Tensor,
        grid_h: torch.Tensor,
        grid_w: torch.Tensor,
    ) -> torch.Tensor:
        """One weight per token (float64, same shape as `row`)."""
        p = normalized_position(row, col, grid_h.long(), grid_w.long(), self.position)
        return PRIORS.get(self.name)(p, **self.hyperparameters())
