"""Level database: every prunable Linear compressed at the levels a search visits, kept on disk.

EvoPress (Sieberling et al., ICML 2025, arXiv:2410.14649) compresses each Linear independently, from
the dense model's calibration inputs, at a grid of levels, and stitches any combination of them into
a candidate model. Because the layers were compressed independently, every stitching is consistent,
and a trial costs no pruning work at all: each Linear just computes with its level's tensor.

Here an *entry* is one Linear at one pruned-weight count, exactly what
:func:`~sparsealloc.pruning.apply.compress_linear` returns for it (the updated weight, and the bias
change of metrics with mean compensation). Entries are built on first use and written to
``ROOT/KEY/<fqn>/<count>.safetensors`` (written to a temporary name, then renamed, so several Ray
workers may fill one database), and read back memory-mapped by later trials, studies, ``export``,
``apply`` and ``prune --plan``. ``KEY`` is a content hash of the model's weights, the metric and its
parameters, the pattern and the calibration windows: a database is reused exactly when it holds
the same layers. Mask-only metrics (Wanda, RIA, STADE without bias...) need none: their cached row
ranks are their database (:mod:`sparsealloc.pruning.masked`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsealloc.core.plan import AllocationPlan, MetricChoice, parse_pattern
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.apply import compress_linear, rank_maskable
from sparsealloc.pruning.masks import pruned_count

#: Bumped when the entry format changes (part of every key).
FORMAT = 1
#: Environment variable naming the cache folder (default ``~/.cache/sparsealloc``).
CACHE_ENV = "SPARSEALLOC_CACHE"


def default_root() -> Path:
    """``$SPARSEALLOC_CACHE/level-db``, else ``~/.cache/sparsealloc/level-db``."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparsealloc"
    return Path(base) / "level-db"


def needs_database(metric: MetricChoice, pattern: str, linears: Sequence[str]) -> bool:
    """Whether some Linear's compression is more than a cut of cached ranks (weight update, bias
    compensation, a per-module rule): then trials stitch layers from a :class:`LevelDatabase`."""
    plan = AllocationPlan(sparsity={}, metric=metric, pattern=pattern)
    return any(not rank_maskable(plan, name) for name in linears)


def content_key(weights: Mapping[str, torch.Tensor], biases: Mapping[str, torch.Tensor | None],
                metric: MetricChoice, pattern: str, windows: torch.Tensor) -> str:
    """Hash of what determines every entry: weights, metric, pattern, calibration windows."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT, "metric": metric.name, "params": dict(metric.params),
                              "pattern": pattern}, sort_keys=True, default=str).encode())
    for name in sorted(weights):
        w = weights[name].detach()
        b = biases.get(name)
        digest.update(f"{name}:{tuple(w.shape)}:{w.dtype}:{float(w.double().sum())}:{float(w.double().abs().sum())}"
                      f":{None if b is None else float(b.double().sum())}".encode())
    digest.update(windows.detach().cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class DatabaseStats:
    """What a database holds and what this process spent on it."""

    entries: int
    bytes_on_disk: int
    built: int
    build_seconds: float

    def describe(self) -> str:
        return (f"{self.entries} entries, {self.bytes_on_disk / 2**20:.0f} MiB on disk; built here: "
                f"{self.built} in {self.build_seconds:.1f} s")


class LevelDatabase:
    """Compressed Linears per pruned-weight count, built on first use (module docstring).

    Args:
        folder: ``ROOT/KEY``.
        metric: The compression method.
        pattern: Sparsity pattern ("unstructured", "2:4"...).
        weights: Dense weight per Linear FQN (read, never written).
        stats: Calibration statistics per Linear FQN (with the Gram matrix where the metric needs it).
        memory_bytes: Entries kept loaded in memory (least recently used dropped first).
    """

    def __init__(self, folder: str | Path, metric: MetricChoice, pattern: str,
                 weights: Mapping[str, torch.Tensor], stats: Mapping[str, LayerStats] | None,
                 memory_bytes: int = 3 * 2**30) -> None:
        self.folder = Path(folder)
        self.metric, self.pattern = metric, pattern
        self.nm = parse_pattern(pattern)
        self.weights, self.stats = weights, stats
        self.memory_bytes = memory_bytes
        self._loaded: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._loaded_bytes = 0
        self.built = 0
        self.build_seconds = 0.0

    @classmethod
    def open(cls, model: nn.Module, linears: Sequence[str], stats: Mapping[str, LayerStats] | None,
             metric: MetricChoice, pattern: str, windows: torch.Tensor, root: str | Path | None = None,
             model_name: str = "") -> LevelDatabase:
        """The database of ``model`` (dense now) under ``root`` (default :func:`default_root`)."""
        modules = dict(model.named_modules())
        weights = {n: modules[n].weight.detach() for n in linears}
        biases = {n: modules[n].bias for n in linears}
        key = content_key(weights, biases, metric, pattern, windows)
        folder = Path(root or default_root()) / key
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps({"format": FORMAT, "model": model_name, "metric": metric.name,
                                        "params": dict(metric.params), "pattern": pattern,
                                        "windows": list(windows.shape)}, default=str, indent=1))
        return cls(folder, metric, pattern, weights, stats)

    @property
    def key(self) -> str:
        return self.folder.name

    def provenance(self) -> dict[str, str]:
        """What a plan records of the database its layers came from."""
        return {"key": self.key, "path": str(self.folder), "metric": self.metric.name}

    def path(self, name: str, count: int) -> Path:
        return self.folder / name / f"{count}.safetensors"

    def entry(self, name: str, ratio: float, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Linear ``name`` compressed at ``ratio`` (its pruned count): from memory, disk, or built now.

        Args:
            dtype: Cast to this dtype (kept in memory cast; None: as stored, the model's dtype).

        Returns:
            (weight, bias delta or None), as :func:`~sparsealloc.pruning.apply.compress_linear`.
        """
        count = pruned_count(self.weights[name].numel(), ratio)
        key = (name, count, dtype)
        cached = self._loaded.get(key)
        if cached is not None:
            self._loaded.move_to_end(key)
            return cached
        path = self.path(name, count)
        value = self._read(path) if path.exists() else None
        if value is None:
            value = self._build(name, ratio, path)
        if dtype is not None and dtype != value[0].dtype:
            value = (value[0].to(dtype), None if value[1] is None else value[1].to(dtype))
        self._remember(key, value)
        return value

    def entries(self, ratios: Mapping[str, float], dtype: torch.dtype | None = None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """:meth:`entry` of every Linear with a ratio > 0."""
        return {name: self.entry(name, ratio, dtype) for name, ratio in ratios.items() if ratio > 0}

    def stats_summary(self) -> DatabaseStats:
        files = list(self.folder.glob("*/*.safetensors"))
        return DatabaseStats(len(files), sum(f.stat().st_size for f in files), self.built, self.build_seconds)

    # ------------------------------------------------------------------------------ internals
    def _read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                weight = f.get_tensor("weight")
                delta = f.get_tensor("bias_delta") if "bias_delta" in keys else None
        except Exception:  # a torn or foreign file: build it again
            return None
        device = next(iter(self.weights.values())).device
        return weight.to(device), None if delta is None else delta.to(device)

    @torch.no_grad()
    def _build(self, name: str, ratio: float, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
        from safetensors.torch import save_file

        start = time.perf_counter()
        stats = self.stats.get(name) if self.stats is not None else None
        weight, delta = compress_linear(self.weights[name], stats, ratio, self.metric, name, self.nm)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": weight.detach().cpu().contiguous()}
        if delta is not None:
            tensors["bias_delta"] = delta.detach().cpu().contiguous()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        self.built += 1
        self.build_seconds += time.perf_counter() - start
        return weight, delta

    def _remember(self, key: tuple, value: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        size = sum(t.numel() * t.element_size() for t in value if t is not None)
        self._loaded[key] = value
        self._loaded_bytes += size
        while self._loaded_bytes > self.memory_bytes and len(self._loaded) > 1:
            _, old = self._loaded.popitem(last=False)
            self._loaded_bytes -= sum(t.numel() * t.element_size() for t in old if t is not None)
