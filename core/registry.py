"""Name → implementation tables for every kind of plug-in (metrics, allocators, samplers...)."""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from sparsealloc.core.errors import DuplicateNameError, SpecError, UnknownNameError

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
            self._eager[name] = obj = getattr(importlib.import_module(module_name), attr)
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


def check_call(fn: Callable[..., Any], params: Mapping[str, Any], what: str, *leading: Any) -> None:
    """Raise a SpecError when ``fn`` does not take ``params``, or a parameter's value does not fit the
    type of ``fn``'s default for it.

    A bool default takes only true/false, a number default only finite numbers (an int default only
    integers), a string default only strings. Parameters without a default are not checked.

    Args:
        fn: The registered implementation (metric, allocator...).
        params: Keyword parameters the user gave.
        what: How to name ``fn`` in the message ("pruning metric 'stade'").
        leading: Placeholders of the positional arguments ``fn`` takes before ``params``.
    """
    try:
        inspect.signature(fn).bind(*leading, **params)
    except TypeError as exc:
        raise SpecError(f"bad parameters {dict(params)} for {what}: {exc}") from None
    signature = inspect.signature(fn).parameters
    for key, value in params.items():
        default = signature[key].default if key in signature else inspect.Parameter.empty
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, expected = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            expected = "a finite number"
        elif isinstance(default, str):
            ok, expected = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise SpecError(f"parameter {key!r} of {what} expects {expected}, but got {value!r}")
