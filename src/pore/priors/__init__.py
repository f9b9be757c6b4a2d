"""Reweighting priors: pure functions from a visual token's place in its image grid to a weight.

Each module of this package registers its priors in `PRIORS` when imported (all of them are, here), so a
new prior is one file in this package, or in a plug-in folder (docs/extending.md).
"""

from pore.priors.base import POSITION_MODES, PRIOR_INPUTS, PRIORS, PriorConfig, normalized_position
from pore.priors.padding import padding_fraction
from pore.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "POSITION_MODES",
    "PRIORS",
    "PRIOR_INPUTS",
    "PriorConfig",
    "normalized_position",
    "padding_fraction",
]
