"""What every prior shares: the registry, the normalised position, and `PriorConfig` (a prior + settings).

PoRe multiplies each image token's attention score by `w(p)`, where `p` in [0, 1] is the token's normalised
position in raster order (by row, or by raster index). Causal LMs pay inflated attention to late tokens,
so a prior that decreases with `p` counteracts that recency bias before the top-k.

A prior is a pure function registered in `PRIORS` (one module of this package, or of a plug-in folder: see
docs/extending.md); its keyword parameters become the strategy's `prior.<name>` settings, and its config
file (conf/prior/<name>.yaml) states their defaults for the presets. A prior function names the inputs it
needs among `PRIOR_INPUTS`: most take `p` alone; the `calibrated` prior (a profile measured by
`src/calibrate.py`) takes the token's `row`, `col`, `grid_h`, `grid_w`, the `position` mode and the
strategy's pruning `layer`; the `table` prior (weights read from a file) takes `row`, `col`, `grid_h` and
`grid_w`; the `temporal` prior takes `frame` and `frames` (a token's frame in its video, the video's frame
count; 0 and 1 for images).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from pore.priors.padding import PAD_RULES
from pore.registry import Registry

PositionMode = Literal["row", "index"]
POSITION_MODES: tuple[str, ...] = ("row", "index")

PriorFunction = Callable[..., torch.Tensor]
PRIORS: Registry[PriorFunction] = Registry("prior")

# What a prior function may ask for by naming it as a parameter; every other parameter is a hyperparameter
# (a `strategy.prior.<name>` setting). `layer` is the strategy's (first) pruning layer K, or None.
# `frame` / `frames`: the token's frame in its video and the video's frame count (0 and 1 for images).
PRIOR_INPUTS: tuple[str, ...] = (
    "p",
    "row",
    "col",
    "grid_h",
    "grid_w",
    "position",
    "layer",
    "frame",
    "frames",
)
# A setting `<key>_by_data` holds `<key>` per data set (`PriorConfig.for_data`).
BY_DATA = "_by_data"


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
    # Which cells are border (`pore.priors.padding`): expand2square_area | generate_pad_mask | bilinear_mask.
    pad_rule: str = "expand2square_area"
    # With suppress_padding: rank only the tokens that are not padding and cut the budget to their number
    # (FastV as the PoRe authors run it), instead of filling the budget with zero-scored padding tokens.
    budget_from_unpadded: bool = False
    # A `<key>_by_data` table must name the data set being run (for the settings this prior takes): a
    # preset calibrated per benchmark (the PoRe authors' sigma) refuses the others instead of guessing.
    require_data: bool = False
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

    def for_data(self, data: str | None) -> PriorConfig:
        """This prior on the data set named `data` (`data.name`): a setting `<key>_by_data` (a mapping from
        data names to values, e.g. the PoRe authors' sigma per benchmark) sets `<key>` for the data it
        names; data it does not name keep `<key>` as it is, or, with `require_data`, are refused (for the
        settings this prior takes) with the data sets the table names and how to set `<key>` instead.
        `data=None` (no data set known: the Python API) keeps every setting as it is."""
        if data is None:
            return self
        if self.require_data:
            self._check_calibrated_on(data)
        chosen = {
            key.removesuffix(BY_DATA): table[data]
            for key, table in self.params.items()
            if key.endswith(BY_DATA) and isinstance(table, Mapping) and data in table
        }
        if not chosen:
            return self
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        return PriorConfig.from_mapping({**settings, **self.params, **chosen})

    def _check_calibrated_on(self, data: str) -> None:
        """One line naming the data sets of the first `<key>_by_data` table (of a setting this prior takes)
        that lacks `data`. A setting typed on the command line drops its table (`Strategy.replace`)."""
        taken = inspect.signature(PRIORS.get(self.name)).parameters
        for key, table in self.params.items():
            setting = key.removesuffix(BY_DATA)
            if not key.endswith(BY_DATA) or setting not in taken or setting in PRIOR_INPUTS:
                continue
            names = sorted(table) if isinstance(table, Mapping) else []
            if data not in names:
                calibrated = ", ".join(names) or "none"
                raise ValueError(
                    f"prior {self.name}: strategy.prior.{key} has no {setting} for data.name={data!r} "
                    f"(it was calibrated on: {calibrated}); run one of those, or set "
                    f"strategy.prior.{setting}=<value> yourself (it then holds for every benchmark)"
                )

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
        if self.pad_rule not in PAD_RULES:
            raise ValueError(
                f"unknown strategy.prior.pad_rule {self.pad_rule!r}; valid rules: {', '.join(PAD_RULES)}"
            )
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
        frame: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One weight per token (float64, same shape as `row`); `frame` / `frames` (same shape): the token's
        frame in its video and the video's frame count (None: images, frame 0 of 1)."""
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
            "frame": torch.zeros_like(row, dtype=torch.long) if frame is None else frame.long(),
            "frames": torch.ones_like(row, dtype=torch.long) if frames is None else frames.long(),
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
