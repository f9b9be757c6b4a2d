"""Model-family adapters, registered by name (importing this package registers the built-in ones)."""

from pore.adapters import llava as _llava  # noqa: F401  (registers "llava")
from pore.adapters import llava_next as _llava_next  # noqa: F401  (registers "llava_next", "llava_next_tile")
from pore.adapters import qwen2_vl as _qwen2_vl  # noqa: F401  (registers "qwen2_vl")
from pore.adapters.base import ADAPTERS, ModelAdapter, VisualLayout, adapter_for

__all__ = ["ADAPTERS", "ModelAdapter", "VisualLayout", "adapter_for"]
