"""Name -> object tables, one per kind (models, attacks, defenses, quantizer specs, datasets)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Mapping, TypeVar

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


def make_options(kind: str, name: str, options_type: type, options: Mapping[str, Any]) -> Any:
    """A registered entry's frozen options dataclass from a plain mapping (CLI, YAML), unknown keys refused."""
    known = [f.name for f in dataclasses.fields(options_type)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(f"{kind} {name!r} has no option(s) {', '.join(unknown)}; "
                         f"its options: {', '.join(known) or 'none'}")
    return options_type(**options)
