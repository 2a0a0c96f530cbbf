"""Contracts shared by every layer of sparsealloc: errors, registries, plans, small types.

Nothing here imports torch, optuna or ray at import time.
"""

from sparsealloc.core.errors import (
    DuplicateNameError,
    IncompatiblePlanError,
    SparseAllocError,
    SpecError,
    StorageError,
    TrialFailed,
    UnknownNameError,
)
from sparsealloc.core.plan import SCHEMA_VERSION, AllocationPlan, MetricChoice
from sparsealloc.core.registry import Registry
from sparsealloc.core.types import LayerStats, Outcome, Proposal

__all__ = [
    "SCHEMA_VERSION",
    "AllocationPlan",
    "DuplicateNameError",
    "IncompatiblePlanError",
    "LayerStats",
    "MetricChoice",
    "Outcome",
    "Proposal",
    "Registry",
    "SparseAllocError",
    "SpecError",
    "StorageError",
    "TrialFailed",
    "UnknownNameError",
]
