"""Name → implementation tables for every kind of plug-in (metrics, allocators, samplers...)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from sparsealloc.core.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → implementation table for one kind of plug-in (e.g. "pruning metric").

    Names are API: they are stored in study databases and exported plans. Heavy optional
    dependencies are registered lazily as ``"package.module:attribute"`` and imported on first use.

    Args:
        kind: Human-readable kind, used in error messages ("pruning metric").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._eager: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``.

        Raises:
            DuplicateNameError: ``name`` is already taken.
        """

        def deco(obj: T) -> T:
            self._check_free(name)
            self._eager[name] = obj
            return obj

        return deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"pkg.module:attr"``, imported on the first :meth:`get`."""
        self._check_free(name)
        self._lazy[name] = target

    def get(self, name: str) -> T:
        """Return the implementation registered as ``name``.

        Raises:
            UnknownNameError: with the list of valid names.
        """
        if name in self._eager:
            return self._eager[name]
        if name in self._lazy:
            module_name, _, attr = self._lazy[name].partition(":")
            obj = getattr(importlib.import_module(module_name), attr)
            self._eager[name] = obj
            return obj
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}"
        )

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted({*self._eager, *self._lazy})

    def __contains__(self, name: object) -> bool:
        return name in self._eager or name in self._lazy

    def _check_free(self, name: str) -> None:
        if name in self:
            raise DuplicateNameError(f"{self.kind} {name!r} is registered twice")
