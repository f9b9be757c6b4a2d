"""Model-family adapters, registered by name: each module of this package registers its adapters when
imported (all of them are, here), so a new family is one file in this package (docs/extending.md).
"""

from pore.adapters.base import (
    ADAPTERS,
    LayerFeatures,
    ModelAdapter,
    ModelFacts,
    VisualLayout,
    adapter_class_for_config,
    adapter_for,
)
from pore.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = [
    "ADAPTERS",
    "LayerFeatures",
    "ModelAdapter",
    "ModelFacts",
    "VisualLayout",
    "adapter_class_for_config",
    "adapter_for",
]
