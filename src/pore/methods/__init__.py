"""Pruning methods, registered by name: each module of this package registers its method when imported (all
of them are, here), so a new method is one file in this package, or in a plug-in folder (docs/extending.md).
"""

from pore.methods.base import METHODS, PruningMethod, ScoringInputs
from pore.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["METHODS", "PruningMethod", "ScoringInputs"]
