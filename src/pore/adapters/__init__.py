"""Model-family adapters, registered by name (importing this package registers the built-in ones)."""

from pore.adapters import llava as _llava  # noqa: F401  (registers "llava")
from pore.adapters.base import ADAPTERS, ModelAdapter, VisualLayout, adapter_for

__all__ = ["ADAPTERS", "ModelAdapter", "VisualLayout", "adapter_for"]
