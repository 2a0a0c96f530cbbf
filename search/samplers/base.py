"""The ask/tell seam every sampler implements, and the SAMPLERS registry.

Contract (documented once, tested once in ``tests/contracts/test_sampler_contract.py``):

* ``ask(n)`` returns up to ``n`` proposals, each already recorded as a RUNNING trial of the Optuna
  study (so the dashboard and export see it); it may return fewer (e.g. a generation barrier) and
  never blocks.
* ``tell(number, outcome)`` finishes that trial in the store: values for "complete", state FAIL with
  ``fail_reason`` for "failed", PRUNED for "pruned". It is idempotent: a second tell of the same
  number is ignored. Failed trials are data; a sampler never raises because a trial failed.
* ``enqueue(values, name)`` queues a warm start (uniform, OWL...) to be asked first.
* State lives in the store: a sampler rebuilt on the same study continues from it (resume).

Only the orchestrator (one process, the single writer) calls these methods.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from sparsealloc.core.keys import FAIL_REASON, WARM_START
from sparsealloc.core.registry import Registry
from sparsealloc.core.types import Outcome, Proposal
from sparsealloc.spaces.params import ChoiceParam, FloatParam, IntParam
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.storage.optuna_adapter import set_trial_user_attrs


def to_distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Optuna distributions for the space's parameters (the adapter's job, not the space's)."""
    out: dict[str, BaseDistribution] = {}
    for p in space.params:
        if isinstance(p, FloatParam):
            out[p.name] = FloatDistribution(p.low, p.high, step=p.step, log=p.log)
        elif isinstance(p, IntParam):
            out[p.name] = IntDistribution(p.low, p.high)
        elif isinstance(p, ChoiceParam):
            out[p.name] = CategoricalDistribution(list(p.choices))
    return out


class Sampler(abc.ABC):
    """Ask/tell over one Optuna study (see the module docstring for the contract).

    Args:
        study: The Optuna study that records every trial.
        space: The search space.
    """

    name = "base"

    def __init__(self, study: optuna.Study, space: SearchSpace) -> None:
        self.study = study
        self.space = space
        self.distributions = to_distributions(space)

    @staticmethod
    def make_optuna_sampler(n_objectives: int, seed: int, population_size: int) -> optuna.samplers.BaseSampler:
        """The study's own Optuna sampler. Default: random, never consulted by samplers that enqueue
        every trial with fixed parameters (evo, pymoo NSGA-III)."""
        return optuna.samplers.RandomSampler(seed=seed)

    @abc.abstractmethod
    def ask(self, n: int = 1) -> list[Proposal]:
        """Up to ``n`` new proposals (RUNNING trials)."""

    @abc.abstractmethod
    def tell(self, trial_number: int, outcome: Outcome) -> None:
        """Finish a trial (idempotent)."""

    def enqueue(self, values: Mapping[str, Any], name: str) -> None:
        """Queue a warm start; values are clipped to the space first."""
        clipped = {p.name: p.clip(values[p.name]) for p in self.space.params if p.name in values}
        self.study.enqueue_trial(clipped, user_attrs={WARM_START: name}, skip_if_exists=True)

    @property
    def parked(self) -> int:
        """RUNNING trials this sampler holds between selection stages (not in flight). Default 0."""
        return 0

    def close(self) -> None:
        """End of a run: settle trials held between stages (the evo sampler prunes them). Default: nothing."""

    @property
    def prunes(self) -> bool:
        """Whether :meth:`report` may stop trials (the study has a pruner). Default: no."""
        return False

    def report(self, trial_number: int, step: int, value: float) -> bool:
        """Record an intermediate value; True if the trial should stop (pruners). Default: never.

        Samplers that do not prune record intermediate values only at :meth:`finish`.
        """
        return False

    @staticmethod
    def finish(study: optuna.Study, trial_id: int, number: int, outcome: Outcome) -> None:
        """Write an outcome into the store (attrs, intermediate values, final state)."""
        complete = outcome.state == "complete" and outcome.values is not None
        failed = not complete and outcome.state != "pruned"
        attrs = {**outcome.attrs, FAIL_REASON: outcome.reason or "unknown"} if failed else outcome.attrs
        finite = tuple((step, float(value)) for step, value in outcome.intermediate
                       if value == value and abs(value) != float("inf"))
        set_trial_user_attrs(study, trial_id, dict(attrs), finite)  # one transaction
        if complete:
            study.tell(number, list(outcome.values))
        else:
            study.tell(number, state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.PRUNED)


SAMPLERS: Registry[type[Sampler]] = Registry("sampler")
SAMPLERS.register_lazy("tpe", "sparsealloc.search.samplers.optuna_samplers:TPESampler")
SAMPLERS.register_lazy("cmaes", "sparsealloc.search.samplers.optuna_samplers:CmaEsSampler")
SAMPLERS.register_lazy("random", "sparsealloc.search.samplers.optuna_samplers:RandomSampler")
SAMPLERS.register_lazy("optuna-nsga3", "sparsealloc.search.samplers.optuna_samplers:OptunaNSGA3Sampler")
SAMPLERS.register_lazy("nsga3", "sparsealloc.search.samplers.pymoo_nsga3:PymooNSGA3Sampler")
SAMPLERS.register_lazy("evo", "sparsealloc.search.samplers.evo:EvoSampler")
