"""AllocationPlan: the versioned JSON contract between search, storage, export and the engine.

A plan says, for one model, which pruning metric to use, how sparse each Linear module becomes
(keyed by module FQN as ``named_modules()`` yields it), how many bits each attention layer's
K and V cache get, which decoder blocks are dropped, and where the plan came from.

Example (schema version 1)::

    {
      "schema_version": 1,
      "model": {"name": "smollm2-135m", "n_layers": 30},
      "metric": {"name": "wanda", "params": {}},
      "pattern": "unstructured",
      "sparsity": {"model.layers.0.self_attn.q_proj": 0.5, "model.layers.1": 0.6},
      "kv_bits": {"model.layers.0.self_attn": {"k": 4, "v": 8}},
      "dropped_layers": ["model.layers.12"],
      "provenance": {"study": "demo", "trial": 17, "values": [0.12]}
    }

Sparsity keys may name a Linear module, or any module above Linear modules (a decoder block, an
``mlp``), or ``"*"``: :meth:`AllocationPlan.expand` resolves them to one ratio per Linear FQN, the
most specific key winning.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace as replace_fields
from pathlib import Path
from typing import Any

from sparsealloc.core.errors import IncompatiblePlanError, SpecError, read_user_file

SCHEMA_VERSION = 1
#: Decimals of the sparsity ratios in plan files: drops the float noise of the budget repair
#: (0.5274999999756691 is written 0.5275) and moves the parameter-weighted mean by at most 5e-11.
RATIO_DECIMALS = 10
KV_BIT_CHOICES = (2, 3, 4, 8, 16)
_NM_RE = re.compile(r"^(\d+):(\d+)$")
_TOP_KEYS = {
    "schema_version", "model", "metric", "pattern", "sparsity", "kv_bits", "dropped_layers",
    "provenance",
}


@dataclass(frozen=True)
class MetricChoice:
    """A pruning metric by registry name with its keyword parameters."""

    name: str = "wanda"
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return (n, m) for an "n:m" pattern, None for "unstructured".

    Raises:
        SpecError: anything else.
    """
    if pattern == "unstructured":
        return None
    match = _NM_RE.match(str(pattern))
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return n, m
    raise SpecError(
        f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), but got {pattern!r}"
    )


def _check_ratio(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where} must be a number in [0, 1), but got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise SpecError(f"{where} must be in [0, 1), but got {value}")
    return value


@dataclass(frozen=True)
class AllocationPlan:
    """What to do to a model; the only input of :func:`sparsealloc.pruning.prune_`.

    Attributes:
        sparsity: Ratio in [0, 1) per module FQN (or block / ``"*"`` shorthand key).
        metric: Pruning metric and its parameters.
        pattern: "unstructured" (per output row) or "N:M" (e.g. "2:4").
        kv_bits: Per attention-module FQN, {"k": bits, "v": bits}; bits in {2, 3, 4, 8, 16}.
        dropped_layers: FQNs of decoder blocks removed from the model.
        model: Model identity {"name": ..., "n_layers": ...}; informative, checked if present.
        provenance: Where the plan came from (study, trial, values, sampler, spec hash...).
        schema_version: Version of this JSON schema.
    """

    sparsity: Mapping[str, float] = field(default_factory=dict)
    metric: MetricChoice = field(default_factory=MetricChoice)
    pattern: str = "unstructured"
    kv_bits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    dropped_layers: Sequence[str] = ()
    model: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise SpecError(
                f"plan schema_version must be {SCHEMA_VERSION}, but got {self.schema_version!r}"
            )
        nm = parse_pattern(self.pattern)
        if not isinstance(self.sparsity, Mapping):
            raise SpecError(f"plan 'sparsity' must be an object, but got {type(self.sparsity).__name__}")
        for key, value in self.sparsity.items():
            if not isinstance(key, str) or not key:
                raise SpecError(f"plan sparsity keys must be module names, but got {key!r}")
            ratio = _check_ratio(f"sparsity of {key!r}", value)
            if nm is not None and ratio not in (0.0, 1 - nm[0] / nm[1]):
                raise SpecError(
                    f"with pattern {self.pattern} every sparsity must be 0 or {1 - nm[0] / nm[1]}, "
                    f"but {key!r} has {ratio}"
                )
        for key, bits in self.kv_bits.items():
            if not isinstance(bits, Mapping) or set(bits) != {"k", "v"}:
                raise SpecError(f"kv_bits of {key!r} must be {{'k': bits, 'v': bits}}, but got {bits!r}")
            for which, b in bits.items():
                if b not in KV_BIT_CHOICES or isinstance(b, bool):
                    raise SpecError(
                        f"kv_bits {which} of {key!r} must be one of {list(KV_BIT_CHOICES)}, but got {b!r}"
                    )
        if isinstance(self.dropped_layers, (str, bytes)) or not all(
            isinstance(x, str) for x in self.dropped_layers
        ):
            raise SpecError(f"dropped_layers must be a list of block names, but got {self.dropped_layers!r}")
        if not isinstance(self.metric, MetricChoice):
            raise SpecError(f"metric must be a MetricChoice, but got {self.metric!r}")

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def uniform(
        cls,
        module_names: Iterable[str],
        sparsity: float,
        metric: MetricChoice | None = None,
        pattern: str = "unstructured",
        **kwargs: Any,
    ) -> AllocationPlan:
        """The same ratio for every module in ``module_names``."""
        ratio = _check_ratio("sparsity", sparsity)
        return cls(
            sparsity={name: ratio for name in module_names},
            metric=metric or MetricChoice(),
            pattern=pattern,
            **kwargs,
        )

    @classmethod
    def from_dict(cls, data: Any) -> AllocationPlan:
        """Build and validate a plan from parsed JSON.

        Raises:
            SpecError: unknown schema version, unknown keys, bad ratios or bit-widths.
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a plan must be a JSON object, but got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise SpecError(f"plan schema_version must be {SCHEMA_VERSION}, but got {version!r}")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise SpecError(
                f"plan has unknown keys {sorted(unknown)}; expected keys among {sorted(_TOP_KEYS)}"
            )
        metric = data.get("metric", {})
        if isinstance(metric, str):
            metric = {"name": metric}
        if not isinstance(metric, Mapping) or not isinstance(metric.get("name", "wanda"), str):
            raise SpecError(f"plan 'metric' must be {{'name': str, 'params': {{}}}}, but got {metric!r}")
        params = metric.get("params", {})
        if not isinstance(params, Mapping):
            raise SpecError(f"plan metric 'params' must be an object, but got {params!r}")
        for key in ("sparsity", "kv_bits", "model", "provenance"):
            if not isinstance(data.get(key, {}), Mapping):
                raise SpecError(f"plan {key!r} must be an object, but got {data[key]!r}")
        dropped = data.get("dropped_layers", [])
        if not isinstance(dropped, list):
            raise SpecError(f"plan 'dropped_layers' must be a list, but got {dropped!r}")
        return cls(
            sparsity=dict(data.get("sparsity", {})),
            metric=MetricChoice(metric.get("name", "wanda"), dict(params)),
            pattern=data.get("pattern", "unstructured"),
            kv_bits={k: dict(v) if isinstance(v, Mapping) else v for k, v in data.get("kv_bits", {}).items()},
            dropped_layers=tuple(dropped),
            model=dict(data.get("model", {})),
            provenance=dict(data.get("provenance", {})),
            schema_version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> AllocationPlan:
        """Parse a JSON string (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"a plan must be valid JSON, but parsing failed: {exc}") from None
        except RecursionError:
            raise SpecError("a plan must be valid JSON, but it is nested too deeply to parse") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> AllocationPlan:
        """Read a plan file."""
        return cls.from_json(read_user_file(path, "plan JSON file"))

    # ----------------------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every field."""
        return {
            "schema_version": self.schema_version,
            "model": dict(self.model),
            "metric": self.metric.to_dict(),
            "pattern": self.pattern,
            "sparsity": {k: float(v) for k, v in self.sparsity.items()},
            "kv_bits": {k: {"k": int(v["k"]), "v": int(v["v"])} for k, v in self.kv_bits.items()},
            "dropped_layers": list(self.dropped_layers),
            "provenance": dict(self.provenance),
        }

    def to_json(self) -> str:
        """Pretty JSON text; sparsity ratios rounded to :data:`RATIO_DECIMALS` decimals."""
        data = self.to_dict()
        data["sparsity"] = {k: _tidy_ratio(v) for k, v in data["sparsity"].items()}
        return json.dumps(data, indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON; returns the path.

        The file is written beside the target and renamed over it, so a crash or a full disk never
        leaves a truncated plan behind (the OSError propagates; the old file, if any, stays).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(self.to_json() + "\n", encoding="utf-8")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def replace(self, **changes: Any) -> AllocationPlan:
        """Copy with some fields replaced (validated again)."""
        return replace_fields(self, **changes)

    # ----------------------------------------------------------------------------- resolution
    def expand(self, linear_names: Sequence[str]) -> dict[str, float]:
        """Resolve sparsity keys to one ratio per Linear FQN in ``linear_names``.

        A key is an exact Linear name, a dotted prefix of Linear names (block, sub-module), or "*".
        The most specific (longest) key that covers a module wins; modules no key covers get 0.

        Raises:
            IncompatiblePlanError: a key covers none of ``linear_names``.
        """
        known = list(linear_names)
        prefixes = {n: _dotted_prefixes(n) for n in known}
        covered = {"*"} | {prefix for names in prefixes.values() for prefix in names}
        for key in self.sparsity:
            if key not in covered:
                sample = ", ".join(known[:3]) + (", ..." if len(known) > 3 else "")
                raise IncompatiblePlanError(
                    f"plan names module {key!r}, which is not a prunable Linear module or block of "
                    f"this model; expected names like: {sample}"
                )
        # The keys covering a module are its dotted prefixes (itself included) and "*": the longest
        # one present wins. One dict lookup per prefix, so a per-Linear plan resolves in linear time.
        out: dict[str, float] = {}
        for name in known:
            key = next((k for k in (*prefixes[name], "*") if k in self.sparsity), None)
            out[name] = 0.0 if key is None else float(self.sparsity[key])
        return out

    def check_kv_layers(self, attention_names: Sequence[str]) -> None:
        """Raise IncompatiblePlanError if a kv_bits key is not an attention module FQN."""
        for key in self.kv_bits:
            if key not in attention_names:
                raise IncompatiblePlanError(
                    f"plan kv_bits names {key!r}, which is not an attention module of this model; "
                    f"expected one of: {', '.join(list(attention_names)[:3])}, ..."
                )

    def check_dropped(self, block_names: Sequence[str]) -> None:
        """Raise IncompatiblePlanError if a dropped layer is not a decoder block FQN."""
        for key in self.dropped_layers:
            if key not in block_names:
                raise IncompatiblePlanError(
                    f"plan drops {key!r}, which is not a decoder block of this model; "
                    f"expected one of: {', '.join(list(block_names)[:3])}, ..."
                )
        if len(set(self.dropped_layers)) >= len(block_names) > 0:
            raise IncompatiblePlanError(
                f"plan drops all {len(block_names)} decoder blocks; at least one must remain"
            )


def _dotted_prefixes(name: str) -> list[str]:
    """``name`` and its dotted prefixes, longest first: "a.b.c" → ["a.b.c", "a.b", "a"]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _tidy_ratio(value: float) -> float:
    """``value`` rounded to :data:`RATIO_DECIMALS` decimals, kept below 1 (a ratio is in [0, 1))."""
    rounded = round(value, RATIO_DECIMALS)
    return rounded if rounded < 1.0 else value


def weighted_mean_sparsity(ratios: Mapping[str, float], numels: Mapping[str, int]) -> float:
    """Parameter-weighted mean of per-module ratios: Σ s_i·n_i / Σ n_i."""
    total = sum(numels[name] for name in ratios)
    if total == 0:
        return 0.0
    return sum(ratios[name] * numels[name] for name in ratios) / total
