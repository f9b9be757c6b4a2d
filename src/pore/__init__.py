"""PoRe: position-reweighted visual token pruning for vision-language models.

Public API::

    from pore import Pruner, build_strategy
    with Pruner(model, build_strategy("pore_linear", keep=64)) as pruner:
        output_ids = model.generate(**inputs, max_new_tokens=16)
    pruner.last_record.kept_raster
"""

from pore.adapters import ADAPTERS, ModelAdapter, VisualLayout, adapter_for
from pore.methods import METHODS, PruningMethod, ScoringInputs
from pore.priors import PRIORS, PriorConfig
from pore.pruning import Pruner, PruningRecord
from pore.registry import Registry, UnknownNameError
from pore.strategy import STRATEGIES, Strategy, build_strategy

__all__ = [
    "ADAPTERS",
    "METHODS",
    "PRIORS",
    "STRATEGIES",
    "ModelAdapter",
    "PriorConfig",
    "Pruner",
    "PruningMethod",
    "PruningRecord",
    "Registry",
    "ScoringInputs",
    "Strategy",
    "UnknownNameError",
    "VisualLayout",
    "adapter_for",
    "build_strategy",
]
__version__ = "0.1.0"
