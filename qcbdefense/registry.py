"""Name -> object tables, one per kind (models, attacks, defenses, quantizer specs, datasets)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from qcbdefense.errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """A table filled at import time by `@REGISTRY.register(name)`; CLI choices come from `names()`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")

        def add(obj: T) -> T:
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise InputError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
