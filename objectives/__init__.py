"""Objectives of a study: reconstruction-error proxies, remaining weights, KV bytes, perplexity."""

from sparsealloc.objectives.base import OBJECTIVES
from sparsealloc.objectives.context import EvalContext
from sparsealloc.objectives.kv_memory import kv_bytes_per_token
from sparsealloc.objectives.reconstruction import reconstruction_error
from sparsealloc.objectives.trial import TrialEvaluator, TrialState

__all__ = ["OBJECTIVES", "EvalContext", "TrialEvaluator", "TrialState", "kv_bytes_per_token", "reconstruction_error"]
