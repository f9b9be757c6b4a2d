"""The pruning engine and what it reports."""

from pore.engine.pruner import Pruner
from pore.engine.record import PruningRecord

__all__ = ["Pruner", "PruningRecord"]
