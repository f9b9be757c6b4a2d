"""Least-squares fits of the parametric prior forms to a measured attention profile.

A prior w(p) is meant to cancel the bias: profile(p) * w(p) should be flat. So each form is fitted as the
bias it cancels exactly, profile(p) ~= mu / w(p), by least squares on the profile itself:

- exponential: w = exp(-sigma p)    <=>  profile ~= mu * exp(sigma * p)      (the PoRe authors' fit)
- linear:      w = 1 - alpha p      <=>  profile ~= mu / (1 - alpha * p)

with p in [0, 1] (row / (H - 1), or raster index / (N - 1)). sigma > 0 / alpha > 0 mean attention grows
towards the bottom (the recency bias PoRe corrects); negative values mean the profile leans to the top, and
are reported as they are (the `calibrated` prior accepts them; the hand-set `linear` / `exponential` priors
take only alpha in [0, 1) and sigma >= 0).

For a fixed shape parameter the best mu is linear least squares in closed form, so each fit is a 1-D
minimisation: a dense grid over the parameter, then golden-section refinement around the best grid point.
No optimiser dependency, deterministic, and it cannot get lost in a local minimum of a 1-D smooth curve that
the grid resolves. A result at the edge of the search range is flagged `at_bound`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

FORMS: tuple[str, ...] = ("linear", "exponential")

# Search ranges. sigma: exp(30) is far beyond any measured bias. linear: alpha = 1 - exp(t), so alpha < 1
# always (w > 0 on [0, 1]); t in [log 1e-3, log 101] covers alpha from 0.999 down to -100.
_SIGMA_RANGE = (-30.0, 30.0)
_T_RANGE = (math.log(1e-3), math.log(101.0))
_GRID_POINTS = 2001
_GOLDEN_STEPS = 80


@dataclass(frozen=True)
class Fit:
    """One fitted form: `value` of its parameter (`alpha` or `sigma`), scale `mu`, and goodness of fit."""

    form: str  # linear | exponential
    parameter: str  # alpha | sigma
    value: float
    mu: float
    r2: float | None  # 1 - SS_res / SS_tot (None for a flat profile, where SS_tot = 0)
    rmse: float  # root of the weighted mean squared residual, in profile units (1 = uniform attention)
    points: int
    position: str  # row | index: what p was
    at_bound: bool  # the best value is at the edge of the search range

    def bias(self, p: np.ndarray) -> np.ndarray:
        """The fitted profile mu / w(p)."""
        return self.mu * _basis(self.form, self.value, np.asarray(p, dtype=np.float64))

    def weight(self, p: np.ndarray) -> np.ndarray:
        """The prior w(p) (w(0) = 1)."""
        return 1.0 / _basis(self.form, self.value, np.asarray(p, dtype=np.float64))

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        return {
            self.parameter: _round(self.value),
            "mu": _round(self.mu),
            "r2": None if self.r2 is None else _round(self.r2),
            "rmse": _round(self.rmse),
            "points": self.points,
            "position": self.position,
            "at_bound": self.at_bound,
        }


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _basis(form: str, value: float, p: np.ndarray) -> np.ndarray:
    """1 / w(p) for the form: the shape the profile is fitted with (times mu)."""
    if form == "exponential":
        return np.exp(value * p)
    if form == "linear":
        return 1.0 / (1.0 - value * p)
    raise ValueError(f"unknown fit form {form!r}; valid forms: {', '.join(FORMS)}")


def _check(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, ...]:
    p, y = np.asarray(p, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (p.shape == y.shape == w.shape) or p.size < 2:
        raise ValueError(f"need >= 2 points of equal length; got p {p.shape}, y {y.shape}, weights {w.shape}")
    if not (np.isfinite(p).all() and np.isfinite(y).all() and np.isfinite(w).all()) or (w < 0).any():
        raise ValueError("profile, positions and weights must be finite (weights >= 0)")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"positions p must lie in [0, 1], got [{p.min()}, {p.max()}]")
    return p, y, w


def _residual(basis: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(mu, weighted SS_res) of y ~= mu * basis."""
    denominator = float(np.sum(w * basis * basis))
    mu = float(np.sum(w * y * basis)) / denominator if denominator > 0 else 0.0
    return mu, float(np.sum(w * (y - mu * basis) ** 2))


def _minimise(loss: Callable[[float], float], low: float, high: float) -> tuple[float, bool]:
    """argmin of a 1-D function on [low, high]: grid, then golden section around the best grid point."""
    grid = np.linspace(low, high, _GRID_POINTS)
    losses = np.array([loss(float(x)) for x in grid])
    best = int(np.nanargmin(losses))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, _GRID_POINTS - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(_GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    x = (a + b) / 2.0
    # Compare with the grid's best: the refinement never makes it worse.
    if loss(x) > losses[best]:
        x = float(grid[best])
    return float(x), best in (0, _GRID_POINTS - 1)


def _fit(form: str, p: np.ndarray, y: np.ndarray, weights: np.ndarray | None, position: str) -> Fit:
    p, y, w = _check(p, y, weights)
    if form == "exponential":

        def loss(sigma: float) -> float:
            return _residual(_basis("exponential", sigma, p), y, w)[1]

        value, at_bound = _minimise(loss, *_SIGMA_RANGE)
        parameter = "sigma"
    elif form == "linear":

        def loss(t: float) -> float:
            return _residual(_basis("linear", 1.0 - math.exp(t), p), y, w)[1]

        t, at_bound = _minimise(loss, *_T_RANGE)
        value, parameter = 1.0 - math.exp(t), "alpha"
    else:
        raise ValueError(f"unknown fit form {form!r}; valid forms: {', '.join(FORMS)}")
    mu, ss_res = _residual(_basis(form, value, p), y, w)
    total = float(np.sum(w))
    mean = float(np.sum(w * y)) / total if total > 0 else 0.0
    ss_tot = float(np.sum(w * (y - mean) ** 2))
    r2 = None if ss_tot <= 1e-12 * max(1.0, float(np.sum(w * y * y))) else 1.0 - ss_res / ss_tot
    rmse = math.sqrt(ss_res / total) if total > 0 else 0.0
    return Fit(form, parameter, value, mu, r2, rmse, int(p.size), position, at_bound)


def fit_exponential(
    p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, position: str = "row"
) -> Fit:
    """Fit profile ~= mu * exp(sigma * p): sigma is the `exponential` prior's parameter."""
    return _fit("exponential", p, y, weights, position)


def fit_linear(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, position: str = "row") -> Fit:
    """Fit profile ~= mu / (1 - alpha * p): alpha is the `linear` prior's parameter (alpha < 1)."""
    return _fit("linear", p, y, weights, position)


def fit_forms(
    p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, position: str = "row"
) -> dict[str, Fit]:
    """Both forms fitted to the same points."""
    return {form: _fit(form, p, y, weights, position) for form in FORMS}
