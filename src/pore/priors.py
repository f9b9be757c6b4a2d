"""Reweighting priors: pure functions from a visual token's place in its image grid to a weight.

PoRe multiplies each image token's attention score by `w(p)`, where `p` in [0, 1] is the token's normalised
position in raster order (by row, or by raster index). Causal LMs pay inflated attention to late tokens,
so a prior that decreases with `p` counteracts that recency bias before the top-k.

Adding a prior is one decorated function here (and one config file): its keyword parameters become the
strategy's `prior.<name>` settings. A prior function names the inputs it needs among `PRIOR_INPUTS`: most take
`p` alone; the `calibrated` prior (a profile measured by `src/calibrate.py`, see `pore.calibration`) takes
the token's `row`, `col`, `grid_h`, `grid_w`, the `position` mode and the strategy's pruning `layer`; the
`table` prior (weights read from a file, see `pore.priortable`) takes `row`, `col`, `grid_h` and `grid_w`.
"""

from __future__ import annotations

import dataclasses
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

# What a prior function may ask for by naming it as a parameter; every other parameter is a hyperparameter
# (a `strategy.prior.<name>` setting). `layer` is the strategy's (first) pruning layer K, or None.
PRIOR_INPUTS: tuple[str, ...] = ("p", "row", "col", "grid_h", "grid_w", "position", "layer")


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


@PRIORS.register("calibrated")
def calibrated_prior(
    row: torch.Tensor,
    col: torch.Tensor,
    grid_h: torch.Tensor,
    grid_w: torch.Tensor,
    position: str = "row",
    layer: int | None = None,
    path: str | None = None,
    form: str = "profile",
    floor: float = 0.05,
    check_layer: bool = True,
) -> torch.Tensor:
    """w = 1 / (the model's measured attention profile), from a prior file written by `src/calibrate.py`.

    `path` is a prior file, or a folder of them (`layer<K>.json`: the one for this strategy's layer K is
    read). `form`: `profile` divides by the mean attention of each row, `profile2d` by that of each grid cell,
    `gravity` by the RoPE-only attention of a content-free query/key pair (stored in the file);
    `linear` / `exponential` use the fitted alpha / sigma (w = 1 - alpha p, exp(-sigma p), p by `position`).
    Profiles are clamped at `floor` (1 = uniform attention) before dividing, so a weight is at most
    max(profile) / floor times another. Weights are finite, positive and scaled so that the largest weight of
    a grid is 1 (as for `linear` and `exponential`); the top-k inside an image does not depend on the scale.
    A grid size that the file has no profile for is resampled from its best-measured grid (bilinear on the
    normalised coordinates), with a warning. `check_layer`: refuse a file measured for another layer.
    """
    from pore.calibration.priorfile import calibrated_weights  # the file format lives with the calibration

    return calibrated_weights(
        row,
        col,
        grid_h,
        grid_w,
        path=path,
        form=form,
        floor=floor,
        position=position,
        layer=layer,
        check_layer=check_layer,
    )


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

    Runs published weight files unchanged (the PoRe authors' `weight.npy` curves; see `pore.priortable`).
    The weights are used as given (no rescaling). A grid of another size than the file's is refused with
    both shapes in the message, unless `resample` (then: linear over the normalised raster index for a
    vector, bilinear over normalised rows and columns for a grid). A one-token grid has nothing to rank and
    gets weight 1 (the file is still read and checked).
    """
    from pore.calibration.priorfile import gather_tables
    from pore.priortable import load_table

    table = load_table(path)

    def on_grid(h: int, w: int) -> torch.Tensor:
        return torch.ones(1, 1, dtype=torch.float64) if h * w == 1 else table.on_grid(h, w, resample)

    return gather_tables(row, col, grid_h, grid_w, on_grid)


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

    `params` holds the prior function's own hyperparameters (`alpha`, `sigma`, `path`, ...); settings a prior
    does not take are ignored, so one sweep can vary `alpha` and `sigma` across strategies that use either.
    `strategy_layer` is set by the Strategy that holds the prior (its first pruning layer), for priors that
    were measured at a layer.
    """

    name: str = "none"
    position: str = "row"
    suppress_padding: bool = False
    pad_threshold: float = 0.5
    # With suppress_padding: rank only the tokens that are not padding and cut the budget to their number
    # (FastV as the PoRe authors run it), instead of filling the budget with zero-scored padding tokens.
    budget_from_unpadded: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    strategy_layer: int | None = None

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> PriorConfig:
        """Build from a flat mapping such as `{"name": "linear", "alpha": 0.3, "position": "row"}`."""
        structural = {f.name for f in fields(cls)} - {"params"}
        known = {key: value for key, value in settings.items() if key in structural}
        params = {
            key: value for key, value in settings.items() if key not in structural and value is not None
        }
        return cls(**known, params=params)

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that this prior's function takes, with the function's defaults filled in.

        Numbers become floats (as the command line may give `1` for `1.0`); strings, booleans and None stay.
        """
        signature = inspect.signature(PRIORS.get(self.name)).parameters
        return {
            key: _setting(self.params.get(key, parameter.default), parameter.default)
            for key, parameter in signature.items()
            if key not in PRIOR_INPUTS
        }

    def at_layer(self, layer: int | None) -> PriorConfig:
        """This prior as used by a strategy that prunes (first) before decoder layer `layer`."""
        return self if layer == self.strategy_layer else dataclasses.replace(self, strategy_layer=layer)

    def validate(self) -> None:
        PRIORS.get(self.name)
        if self.position not in POSITION_MODES:
            raise ValueError(
                f"unknown prior position {self.position!r}; valid positions: {', '.join(POSITION_MODES)}"
            )
        if not 0.0 <= self.pad_threshold < 1.0:
            raise ValueError(f"prior pad_threshold must be in [0, 1), got {self.pad_threshold}")
        if self.budget_from_unpadded and not self.suppress_padding:
            raise ValueError(
                "prior.budget_from_unpadded cuts the budget to the tokens that padding suppression keeps; "
                "set strategy.prior.suppress_padding=true as well (or budget_from_unpadded=false)"
            )
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
        function = PRIORS.get(self.name)
        wanted = inspect.signature(function).parameters
        inputs: dict[str, Any] = {}
        if "p" in wanted:
            inputs["p"] = normalized_position(row, col, grid_h.long(), grid_w.long(), self.position)
        available = {
            "row": row.long(),
            "col": col.long(),
            "grid_h": grid_h.long(),
            "grid_w": grid_w.long(),
            "position": self.position,
            "layer": self.strategy_layer,
        }
        inputs.update({key: value for key, value in available.items() if key in wanted})
        return function(**inputs, **self.hyperparameters())


def _setting(value: Any, default: Any) -> Any:
    """A prior setting in the type of its default: floats for numbers, bool for flags, else unchanged."""
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
