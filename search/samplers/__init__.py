"""Samplers behind one ask/tell seam: Optuna TPE, random, Optuna NSGA-III, pymoo NSGA-III."""

from sparsealloc.search.samplers.base import SAMPLERS, Sampler, to_distributions

__all__ = ["SAMPLERS", "Sampler", "to_distributions"]
