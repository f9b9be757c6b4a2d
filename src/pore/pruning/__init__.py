"""The pruning engine and what it reports."""

from pore.pruning.engine import Pruner
from pore.pruning.record import PruningRecord

__all__ = ["Pruner", "PruningRecord"]
