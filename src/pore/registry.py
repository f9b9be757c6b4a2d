"""A name -> object registry that fails with the list of valid names.

Priors, pruning methods, model adapters and strategies are all looked up by the names that users type on
the command line, so an unknown name must say which names exist.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not registered; the message lists the registered ones."""


class Registry(Generic[T]):
    """Maps names to objects; `register` is usable as a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def unregister(self, name: str) -> T:
        """Remove `name` (a plug-in unloaded, a test cleaning up); returns what was registered."""
        return self._entries.pop(name)

    @contextmanager
    def registered(self, name: str, obj: T) -> Iterator[T]:
        """`obj` registered as `name` inside the `with` block only (a method written in a test, say)."""
        self.add(name, obj)
        try:
            yield obj
        finally:
            self.unregister(name)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (`import_submodules(__name__, __path__)` in its `__init__`).

    Methods, priors, adapters and benchmarks register themselves when their module is imported, so that
    adding one is adding one file: no list of modules to keep up to date. Modules whose name starts with an
    underscore are left out.
    """
    for module in sorted(pkgutil.iter_modules(path), key=lambda info: info.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")
