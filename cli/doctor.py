"""``sparsealloc doctor``: check the installation, the embedded model, a store and Ray; say what to fix.

One line per check, ``OK``, ``WARN`` (optional, the feature it enables is unavailable) or ``FAIL``
(required), each failing line ending with what to do. Nothing is written anywhere: the store is
probed read-only, the model's weights are read only with ``--load-model``. Exit code 0 when every
required check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sparsealloc.cli.common import DEFAULT_MODEL
from sparsealloc.cli.study import DEFAULT_STORAGE
from sparsealloc.core.errors import SparseAllocError

MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Check:
    """The result of one check.

    Attributes:
        name: What was checked ("torch", "store").
        status: "OK", "WARN" or "FAIL".
        detail: What was found.
        fix: What to do (empty when OK).
    """

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<5} {self.name}: {self.detail}"
        return f"{text}; fix: {self.fix}" if self.fix else text


@dataclass(frozen=True)
class Package:
    """An importable dependency: module, distribution name, what needs it, how to install it."""

    module: str
    distribution: str
    needed_for: str
    install: str
    required: bool = False


PACKAGES = (
    Package("transformers", "transformers", "loading models", "pip install 'transformers>=4.56'", True),
    Package("optuna", "optuna", "studies", "pip install 'optuna>=4.4,<6'", True),
    Package("sqlalchemy", "sqlalchemy", "the study store", "pip install 'sqlalchemy>=2'", True),
    Package("pymoo", "pymoo", "the nsga3 sampler", "pip install 'sparsealloc[nsga]'"),
    Package("ray", "ray", "--workers (Ray actors)", "pip install 'sparsealloc[ray]'"),
    Package("psycopg2", "psycopg2-binary", "PostgreSQL stores", "pip install 'sparsealloc[postgres]'"),
    Package("optuna_dashboard", "optuna-dashboard", "sparsealloc dashboard", "pip install 'sparsealloc[dashboard]'"),
    Package("datasets", "datasets", "--calib-dataset", "pip install 'sparsealloc[datasets]'"),
)


def register(sub) -> None:
    parser = sub.add_parser("doctor", help="check the installation, the embedded model, a store and Ray")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help=f"store URL to probe (default {DEFAULT_STORAGE})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model to check (default {DEFAULT_MODEL})")
    parser.add_argument("--load-model", action="store_true", help="also load the model's weights (slow)")
    parser.add_argument("--ray-address", default=None, help="HOST:PORT (or 'auto') of a Ray cluster to reach")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    checks: list[tuple[Callable[[], Check], bool]] = [
        (check_python, True),
        (check_torch, True),
        (check_cpu_load, False),
        (check_bfloat16, False),
        *[(lambda p=p: check_package(p), p.required) for p in PACKAGES],
        (lambda: check_model(args.model, args.load_model), True),
        (lambda: check_store(args.storage), True),
        (lambda: check_ray(args.ray_address), args.ray_address is not None),
    ]
    failed = 0
    for make, required in checks:
        try:
            result = make()
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check, not a crash
            result = Check(getattr(make, "__name__", "check"), "FAIL", f"{type(exc).__name__}: {exc}",
                           "report this with the output of sparsealloc --debug doctor")
        if result.status == "FAIL" and not required:
            result = Check(result.name, "WARN", result.detail, result.fix)
        failed += result.status == "FAIL"
        print(result.line(), flush=True)
    print(f"{'all required checks passed' if not failed else f'{failed} required check(s) failed'}")
    return 1 if failed else 0


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", "FAIL", f"{version} at {sys.executable}",
                     f"use Python >= {'.'.join(map(str, MIN_PYTHON))}")
    return Check("python", "OK", f"{version} at {sys.executable}")


def check_torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", "FAIL", f"not importable ({exc})",
                     "pip install -c constraints.txt torch==2.13.0 (see the README's Set up)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        device = f"cuda: {torch.cuda.device_count()} device(s): {names}"
    else:
        device = "cpu (no CUDA device visible; trials run on the CPU)"
    return Check("torch", "OK", f"{torch.__version__}, {device}, {torch.get_num_threads()} threads")


def check_cpu_load(threads: int | None = None) -> Check:
    """Warn when other jobs keep the cores busy that torch's threads expect to have.

    Cores busy elsewhere are the whole part of the 1-minute load average (this command's own short
    run adds little to it); when torch's threads exceed the cores left free, they are oversubscribed.

    Args:
        threads: torch's CPU threads (default: ``torch.get_num_threads()``, else the core count).
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows, or no /proc/loadavg
        return Check("cpu load", "OK", "load average not available on this system")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = cores
    free = max(0, cores - int(load))
    detail = f"1-minute load average {load:.2f} on {cores} core(s), {free} free; torch uses {threads} thread(s)"
    if int(load) >= 1 and threads > free:
        return Check("cpu load", "WARN", f"{detail}: another job shares the CPU: trials may run several times "
                                         f"slower; torch threads oversubscribed",
                     f"wait for the other job, or give torch the free cores: OMP_NUM_THREADS={max(1, free)}")
    return Check("cpu load", "OK", detail)


def check_bfloat16(size: int = 768, repeats: int = 5, timer: Callable[[], float] = time.perf_counter) -> Check:
    """Compare a bfloat16 with a float32 matrix product on the trial device: evo trials
    (``proxy_dtype: auto``) run in bfloat16 only where it is the faster (AMX/AVX-512 BF16, GPUs).
    """
    from sparsealloc.pruning.model.models import bfloat16_speedup, resolve_device

    device = resolve_device(None)
    fp32, bf16 = bfloat16_speedup(device, size, repeats, timer)
    detail = f"{size}² product on {device}: bfloat16 {bf16 * 1e3:.2f} ms, float32 {fp32 * 1e3:.2f} ms"
    if bf16 > fp32:
        return Check("bfloat16", "WARN", f"{detail}: bfloat16 is slower here, so evo trials (proxy_dtype: auto) "
                     "run in float32", "nothing to do (proxy_dtype: float32 makes it explicit)")
    return Check("bfloat16", "OK", f"{detail} ({fp32 / max(bf16, 1e-9):.1f}× faster; evo trials use it)")


def check_package(package: Package) -> Check:
    name = f"{package.distribution} (for {package.needed_for})"
    if importlib.util.find_spec(package.module) is None:
        return Check(name, "FAIL", "not installed", package.install)
    version = _version(package.distribution)
    if package.required:  # import it: a broken install fails here, not in the middle of a study
        try:
            importlib.import_module(package.module)
        except Exception as exc:  # noqa: BLE001
            return Check(name, "FAIL", f"{version} does not import: {type(exc).__name__}: {exc}",
                         f"reinstall: {package.install}")
    return Check(name, "OK", version)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"


def check_model(name: str, load: bool) -> Check:
    from sparsealloc.pruning.model.models import EMBEDDED_MODELS, INSTALL_HINT, resolve_source

    label = f"model {name}"
    try:
        source = resolve_source(name)
    except SparseAllocError as exc:
        fix = INSTALL_HINT if name in EMBEDDED_MODELS else "pass --model a model folder, .gguf file or hub id"
        return Check(label, "FAIL", str(exc), fix)
    where = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)
    found = f"{where}" + (f" ({where.stat().st_size / 2**20:.0f} MiB)" if where.is_file() else "")
    if not load:
        return Check(label, "OK", f"found {found}; weights not loaded (--load-model loads them)")
    from sparsealloc.pruning.model.models import load_model

    start = time.perf_counter()
    try:
        model, _, _ = load_model(name, device="cpu")
    except SparseAllocError as exc:
        return Check(label, "FAIL", str(exc), "reinstall the model package or check the folder's files")
    params = sum(p.numel() for p in model.parameters())
    return Check(label, "OK", f"loaded {params / 1e6:.1f} M parameters from {found} in "
                              f"{time.perf_counter() - start:.1f} s")


def check_store(url: str) -> Check:
    from sparsealloc.storage.rdb import probe_storage, redact

    label = f"store {redact(url)}"
    try:
        info = probe_storage(url)
    except SparseAllocError as exc:
        return Check(label, "FAIL", str(exc), _store_fix(url))
    if not info.exists:
        return Check(label, "OK", "not created yet; the first 'study run' creates it here")
    if not info.has_schema:
        return Check(label, "FAIL", "reachable, but holds no Optuna tables (not a study store)",
                     "point --storage at a study store, or at an empty database the first 'study run' may fill")
    problem = info.schema_problem()
    if problem:
        return Check(label, "FAIL", f"schema {info.schema_version}, expected {info.head_version}",
                     problem.split("; ", 1)[-1])
    return Check(label, "OK", f"{info.backend}, Optuna schema {info.schema_version} (current), "
                              f"{info.n_studies} stud{'y' if info.n_studies == 1 else 'ies'}")


def _store_fix(url) -> str:
    text = url if isinstance(url, str) else ""
    if text.startswith("postgresql"):
        return "start the PostgreSQL server (docker compose up -d postgres) or correct host, port and database"
    if text.startswith("sqlite") or text.endswith(".db"):
        return "use sqlite:///PATH with PATH in an existing, writable folder"
    return "use sqlite:///study.db or postgresql+psycopg2://user@host:5432/db"


def check_ray(address: str | None) -> Check:
    if importlib.util.find_spec("ray") is None:
        return Check("ray", "FAIL", "not installed", "pip install 'sparsealloc[ray]'")
    version = _version("ray")
    if address is None:
        return Check("ray", "OK", f"{version}; --workers N starts a local cluster (--ray-address checks one)")
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS") or _local_ray_address()
        if not found:
            return Check(f"ray {address}", "FAIL", "no running local Ray cluster found",
                         "start one with: ray start --head")
        address = found
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return Check(f"ray {address}", "FAIL", "not HOST:PORT", "pass --ray-address HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        return Check(f"ray {address}", "FAIL", f"cannot connect: {exc.strerror or exc}",
                     "start the Ray head (ray start --head, or docker compose up -d ray-head) or correct the address")
    return Check(f"ray {address}", "OK", f"{version}; the head's port answers")


def _local_ray_address() -> str | None:
    """The address ``ray start --head`` left for local clients, if any."""
    path = Path("/tmp/ray/ray_current_cluster")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None
