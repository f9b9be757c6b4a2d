"""PoRe: position-reweighted visual token pruning for vision-language models.

Public API::

    from pore import Pruner, build_strategy
    with Pruner(model, build_strategy("pore_linear", keep=64)) as pruner:
        output_ids = model.generate(**inputs, max_new_tokens=16)
    pruner.last_record.kept_raster

`import pore` loads the library only (torch, transformers): neither Lightning nor Hydra.
"""

from pore import presets
from pore.adapters import (
    ADAPTERS,
    ModelAdapter,
    ModelFacts,
    VisualLayout,
    adapter_class_for_config,
    adapter_for,
)
from pore.engine import Pruner, PruningRecord
from pore.methods import METHODS, PruningMethod, ScoringInputs
from pore.presets import build_strategy
from pore.priors import PRIORS, PriorConfig
from pore.registry import Registry, UnknownNameError
from pore.strategy import Strategy

__all__ = [
    "ADAPTERS",
    "METHODS",
    "PRIORS",
    "ModelAdapter",
    "ModelFacts",
    "PriorConfig",
    "Pruner",
    "PruningMethod",
    "PruningRecord",
    "Registry",
    "ScoringInputs",
    "Strategy",
    "UnknownNameError",
    "VisualLayout",
    "adapter_class_for_config",
    "adapter_for",
    "build_strategy",
    "presets",
]
__version__ = "0.1.0"
