"""Search parameters as plain data (no optimizer imports): floats, ints and categorical choices.

Names are flat and "/"-joined with zero-padded indices (``sparsity/block_07``,
``kv_bits/layer_07/k``), so string order equals numeric order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class FloatParam:
    """A float in [low, high], optionally on a grid of ``step``."""

    name: str
    low: float
    high: float
    step: float | None = None
    log: bool = False

    def clip(self, value: float) -> float:
        value = min(self.high, max(self.low, float(value)))
        if self.step:
            value = self.low + round((value - self.low) / self.step) * self.step
            value = min(self.high, max(self.low, value))
        return value


@dataclass(frozen=True)
class IntParam:
    """An integer in [low, high]."""

    name: str
    low: int
    high: int

    def clip(self, value: float) -> int:
        return int(min(self.high, max(self.low, round(float(value)))))


@dataclass(frozen=True)
class ChoiceParam:
    """One of ``choices`` (JSON scalars)."""

    name: str
    choices: tuple[Any, ...]

    def clip(self, value: Any) -> Any:
        if value in self.choices:
            return value
        # Snap numbers to the nearest choice (e.g. bit-widths), else the first choice.
        numeric = [c for c in self.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if isinstance(value, (int, float)) and numeric:
            return min(numeric, key=lambda c: abs(c - value))
        return self.choices[0]


Param = Union[FloatParam, IntParam, ChoiceParam]
