"""Early stopping of trials: Optuna pruners built from a study's ``early_stopping`` spec.

Registry ``PRUNERS`` (``none``, ``median``, ``successive_halving``). A trial reports its error proxy
after every calibration batch (see :mod:`sparsealloc.objectives.trial` for the steps of the
fidelity ladder); the orchestrator hands each value to :meth:`Sampler.report
<sparsealloc.search.samplers.base.Sampler.report>`, which records it as an Optuna intermediate value
and asks the study's pruner whether to stop. A stopped trial is told PRUNED with its intermediate
values (TPE ranks pruned trials by how far they got and their last value).

Early stopping runs in process only (the local dispatcher): Ray actors score trials to full
fidelity, and their intermediate values are written after the fact.
"""

from __future__ import annotations

import optuna

from sparsealloc.core.registry import Registry
from sparsealloc.spaces.spec import EarlyStoppingSpec

PRUNERS: Registry = Registry("pruner")


@PRUNERS.register("none")
def no_pruner(spec: EarlyStoppingSpec) -> optuna.pruners.BasePruner:
    """Never stop a trial."""
    return optuna.pruners.NopPruner()


@PRUNERS.register("median")
def median_pruner(spec: EarlyStoppingSpec) -> optuna.pruners.BasePruner:
    """Optuna's MedianPruner: stop when the best value so far is worse than the completed trials'
    median at the same step (after ``startup_trials`` completed trials and ``warmup_steps``)."""
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_steps)


@PRUNERS.register("successive_halving")
def successive_halving_pruner(spec: EarlyStoppingSpec) -> optuna.pruners.BasePruner:
    """Optuna's SuccessiveHalvingPruner (asynchronous successive halving, Li et al. 2020,
    arXiv:1810.05934): rungs at steps 1, η, η², …; a trial goes on past a rung only if its value
    there is in the best 1/η of all values recorded at that rung so far."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=spec.reduction_factor,
                                                  min_early_stopping_rate=0)


def make_pruner(spec: EarlyStoppingSpec) -> optuna.pruners.BasePruner:
    """The Optuna pruner for ``spec`` (``PRUNERS.get(spec.pruner)(spec)``)."""
    return PRUNERS.get(spec.pruner)(spec)
