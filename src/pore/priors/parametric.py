"""The parametric priors: no reweighting, and the linear and exponential forms of PoRe.

p in [0, 1] is the token's normalised position in its image grid (`strategy.prior.position`: by row, or by
raster index); causal LMs pay inflated attention to late tokens, so a weight that decreases with p
counteracts that recency bias before the top-k.
"""

from __future__ import annotations

import math

import torch

from pore.priors.base import PRIORS


@PRIORS.register("none")
def none_prior(p: torch.Tensor) -> torch.Tensor:
    """w = 1: plain attention ranking (FastV)."""
    return torch.ones_like(p)


@PRIORS.register("linear")
def linear_prior(p: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """w = 1 - alpha * p, alpha in [0, 1), so every weight stays positive."""
    if not 0.0 <= alpha < 1.0 or math.isnan(alpha):
        raise ValueError(f"linear prior: alpha must be in [0, 1), got {alpha}")
    return 1.0 - alpha * p


@PRIORS.register("exponential")
def exponential_prior(p: torch.Tensor, sigma: float = 0.95) -> torch.Tensor:
    """w = exp(-sigma * p), sigma >= 0 (the form the PoRe authors fitted per method and benchmark)."""
    if not sigma >= 0.0:  # also rejects NaN
        raise ValueError(f"exponential prior: sigma must be >= 0, got {sigma}")
    return torch.exp(-sigma * p)
