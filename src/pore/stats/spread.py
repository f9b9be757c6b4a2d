"""Mean and spread of a number over repeated runs (seeds of a stochastic strategy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Over `n` runs: the mean, the sample standard deviation (ddof 1; 0 for one run) and the range."""

    mean: float
    sd: float
    low: float
    high: float
    n: int


def spread(values: Sequence[float] | np.ndarray) -> Spread:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values")
    sd = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return Spread(float(array.mean()), sd, float(array.min()), float(array.max()), int(array.size))
