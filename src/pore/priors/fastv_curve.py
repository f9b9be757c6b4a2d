"""The PoRe authors' FastV curve (`playground/data/weight/FastV/weight.npy` of intcomp/attention-bias) in
closed form.

Their FastV weights are one curve for all benchmarks, not an exponential: 576 values over the raster index of
LLaVA-1.5's 24 x 24 grid. Read as numbers, the file is exactly the inverse of a cubic in x = i / 575,

    w(x) = 1 / (1 + a x + b x^2 + c x^3),

i.e. the inverse of a cubic recency trend fitted to the attention and normalised to 1 at the first token (the
exponential presets are the inverse of an exponential trend). The coefficients below are the least-squares
cubic through 1 / weight.npy, rounded to 12 decimals: they reproduce every one of the 576 weights within
1e-13 (tests/test_authors_weights.py reads the file and checks it), so the project carries the curve
without carrying the authors' file. `strategy.prior.name=table strategy.prior.path=.../FastV/weight.npy` still
runs the file itself.

On another grid size the curve is read over the normalised position p (the position mode of the config:
`index`, p = i / (N - 1), in the presets), as the exponential presets are.
"""

from __future__ import annotations

import torch

from pore.priors.base import PRIORS

# 1 / w = 1 + a p + b p^2 + c p^3 (least squares on 1 / FastV/weight.npy; max |fit - file| = 7e-14)
FASTV_INVERSE_CUBIC: tuple[float, ...] = (1.0, 1.733738621924, -4.826433446361, 4.884125654044)


@PRIORS.register("pore_fastv_curve")
def pore_fastv_curve(p: torch.Tensor) -> torch.Tensor:
    """w = 1 / (1 + a p + b p^2 + c p^3): the PoRe authors' FastV weights (1.0 at p = 0, 0.358 at p = 1;
    positive and decreasing on [0, 1], a plateau near 0.82 in the middle rows)."""
    inverse = torch.zeros_like(p, dtype=torch.float64)
    for coefficient in reversed(FASTV_INVERSE_CUBIC):  # Horner's rule
        inverse = inverse * p.double() + coefficient
    return 1.0 / inverse
