"""Named registries of extension points (datasets, evaluation measures, attacks)."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A dict of ``kind`` entries by name whose built-in entries cannot be removed."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.built_in: frozenset[str] = frozenset()

    def add(self, name: str, entry: T) -> T:
        """Add ``entry`` under a new ``name``."""
        if not name:
            raise ValueError(f"a {self.kind} needs a name")
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Remove an entry added after :meth:`freeze` (the built-in ones stay)."""
        if name in self.built_in:
            raise ValueError(f"{name!r} is a built-in {self.kind}")
        self.pop(name, None)

    def freeze(self) -> None:
        """Mark the entries present now as built in."""
        self.built_in = frozenset(self)

    def get_entry(self, name: str) -> T:
        """The entry of ``name``, or a ValueError listing the known names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}")
        return self[name]
