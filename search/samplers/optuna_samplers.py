"""Samplers backed by Optuna's own: TPE (multivariate), random, and Optuna's NSGA-III."""

from __future__ import annotations

import math

import optuna

from sparsealloc.core.types import Outcome, Proposal
from sparsealloc.search.samplers.base import Sampler
from sparsealloc.storage.optuna_adapter import trial_id_of


class OptunaSampler(Sampler):
    """Ask/tell straight onto ``study.ask(fixed_distributions)`` / ``study.tell``.

    Lifecycle:
        ask() → ``study.ask`` (WAITING warm starts are popped first) → Proposal
        tell() → attrs, intermediate values, then ``study.tell`` with values or FAIL/PRUNED

    Asynchronous-friendly: trials in flight are seen by TPE through its constant liar.
    """

    name = "optuna"

    def __init__(self, study: optuna.Study, space) -> None:
        super().__init__(study, space)
        self._pending: dict[int, optuna.Trial] = {}

    def ask(self, n: int = 1) -> list[Proposal]:
        out = []
        for _ in range(n):
            trial = self.study.ask(fixed_distributions=self.distributions)
            self._pending[trial.number] = trial
            out.append(Proposal(trial.number, dict(trial.params), dict(trial.user_attrs)))
        return out

    @property
    def prunes(self) -> bool:
        """True when the study has a pruner other than Optuna's NopPruner (early stopping)."""
        return not isinstance(self.study.pruner, optuna.pruners.NopPruner)

    def report(self, trial_number: int, step: int, value: float) -> bool:
        """``trial.report(value, step)`` then ``trial.should_prune()`` (the study's pruner).

        Non-finite values are not recorded and never stop a trial (it fails at the end instead).
        """
        trial = self._pending.get(trial_number)
        if trial is None or not math.isfinite(value):
            return False
        trial.report(value, step)
        return trial.should_prune()

    def tell(self, trial_number: int, outcome: Outcome) -> None:
        trial = self._pending.pop(trial_number, None)
        if trial is None:
            return  # already told (idempotent) or not ours
        self.finish(self.study, trial_id_of(trial), trial_number, outcome)


class TPESampler(OptunaSampler):
    """Optuna TPE, multivariate (Bergstra et al. 2011; Optspa's sampler), constant liar for async."""

    name = "tpe"

    @staticmethod
    def make_optuna_sampler(n_objectives: int, seed: int, population_size: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=10)


class RandomSampler(OptunaSampler):
    """Uniform random search (a baseline)."""

    name = "random"  # the base class's study sampler: Optuna's RandomSampler


class CmaEsSampler(OptunaSampler):
    """Optuna's CMA-ES (Hansen 2016, *The CMA Evolution Strategy: A Tutorial*), single objective.

    Starts at the centre of the search space (the uniform allocation, for windows centred on the
    target) with step size a sixth of the narrowest range; categorical parameters (metric, KV bits)
    are sampled independently.
    """

    name = "cmaes"

    @staticmethod
    def make_optuna_sampler(n_objectives: int, seed: int, population_size: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


class OptunaNSGA3Sampler(OptunaSampler):
    """Optuna's NSGAIIISampler (OptiShear's choice), generation tracked by Optuna itself."""

    name = "optuna-nsga3"

    @staticmethod
    def make_optuna_sampler(n_objectives: int, seed: int, population_size: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIIISampler(population_size=population_size, seed=seed)
