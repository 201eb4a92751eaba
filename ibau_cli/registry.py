"""One small generic registry, used for formats, architectures and probes.

Each entry remembers where it came from: ``builtin``, or the plugin being loaded when it was
registered (``registering_from`` sets that while a plugin's code runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")
_ORIGINS: list[str] = ["builtin"]
_REGISTRIES: list[Registry] = []


@contextmanager
def registering_from(origin: str) -> Iterator[None]:
    """Entries registered inside this block are recorded as coming from ``origin``; if the block
    fails, they are removed again (a plugin loads whole or not at all)."""
    _ORIGINS.append(origin)
    try:
        yield
    except BaseException:
        for registry in _REGISTRIES:
            registry.forget_origin(origin)
        raise
    finally:
        _ORIGINS.pop()


class Registry(Generic[T]):
    """A name -> object mapping that remembers where each entry came from."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        _REGISTRIES.append(self)

    def forget_origin(self, origin: str) -> None:
        """Remove every entry registered from ``origin``."""
        for key in [k for k, o in self._origin.items() if o == origin]:
            del self._items[key], self._origin[key]

    def register(self, name: str, item: T, *, origin: str | None = None) -> T:
        origin = origin or _ORIGINS[-1]
        key = name.lower()
        if key in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered (from {self._origin[key]})")
        self._items[key] = item
        self._origin[key] = origin
        return item

    def decorator(self, name: str, *, origin: str | None = None) -> Callable[[T], T]:
        def wrap(item: T) -> T:
            return self.register(name, item, origin=origin)

        return wrap

    def get(self, name: str) -> T | None:
        return self._items.get(name.lower())

    def names(self) -> list[str]:
        return sorted(self._items)

    def origin(self, name: str) -> str:
        return self._origin[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
