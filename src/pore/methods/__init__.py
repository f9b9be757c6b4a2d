"""Pruning methods, registered by name (importing this package registers the built-in ones)."""

from pore.methods import fastervlm as _fastervlm  # noqa: F401
from pore.methods import fastv as _fastv  # noqa: F401
from pore.methods import none as _none  # noqa: F401
from pore.methods import pdrop as _pdrop  # noqa: F401
from pore.methods import pool as _pool  # noqa: F401
from pore.methods import random_keep as _random_keep  # noqa: F401
from pore.methods import sparsevlm as _sparsevlm  # noqa: F401
from pore.methods.base import METHODS, PruningMethod, ScoringInputs

__all__ = ["METHODS", "PruningMethod", "ScoringInputs"]
