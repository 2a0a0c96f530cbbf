"""pymoo's NSGA-III behind the ask/tell seam, every individual mirrored as an Optuna trial.

NSGA-III (Deb & Jain 2014, "An Evolutionary Many-Objective Optimization Algorithm Using
Reference-Point-Based Nondominated Sorting Approach, Part I", IEEE TEVC 18(4)) keeps diversity
with Das-Dennis reference directions instead of crowding distance. We run pymoo's implementation
(Blank & Deb 2020, "pymoo: Multi-Objective Optimization in Python", IEEE Access 8) through its
problem-independent ask/tell interface: pymoo proposes a generation, the orchestrator scores it
trial by trial, and the scores go back through :class:`pymoo.problems.static.StaticProblem`.

The pymoo algorithm object is never persisted (plain ``pickle`` of an NSGA3 object fails in pymoo
0.6.2); the Optuna store is the state. A sampler built on an existing study rebuilds its
population from the stored trials and continues with the next generation index.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from pymoo.algorithms.moo.nsga3 import NSGA3, ReferenceDirectionSurvival
from pymoo.core.evaluator import Evaluator
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.sampling.rnd import FloatRandomSampling
from pymoo.problems.static import StaticProblem
from pymoo.util.ref_dirs import get_reference_directions

from sparsealloc.core.keys import GENERATION, RETRY_OF, SOURCE as SOURCE_KEY, WARM_START
from sparsealloc.core.types import Outcome, Proposal
from sparsealloc.search.samplers.base import Sampler
from sparsealloc.spaces.params import FloatParam, IntParam, Param
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.storage.optuna_adapter import pymoo_repair, set_trial_user_attr, trial_id_of

logger = logging.getLogger(__name__)

#: Value of ``user_attrs["source"]`` on every trial told to pymoo.
SOURCE = "pymoo-nsga3"
#: Objective value given to pymoo for a failed or pruned trial (every objective). Together with
#: the constraint violation G = 1 it ranks the individual behind every feasible (complete) one
#: (constrained domination), so the generation can advance without ever seeing its score.
FAILED_PENALTY = 1e10
#: Constraint value of a failed/pruned individual (> 0: infeasible); complete ones get 0.
FAILED_VIOLATION = 1.0
#: Resume reads at most this many populations' worth of the latest finished individuals.
REBUILD_POPULATIONS = 10


def reference_directions(n_objectives: int, population_size: int) -> np.ndarray:
    """Das-Dennis directions, as many as fit in ``population_size`` (at least one partition).

    Args:
        n_objectives: Number of objectives M.
        population_size: Upper bound on the count C(p + M - 1, M - 1).

    Returns:
        Array (n_directions, M); a single direction ``[[1.0]]`` for one objective.
    """
    if n_objectives == 1:
        return np.ones((1, 1))
    partitions = 1
    while math.comb(partitions + 1 + n_objectives - 1, n_objectives - 1) <= population_size:
        partitions += 1
    return get_reference_directions("das-dennis", n_objectives, n_partitions=partitions)


class _Codec:
    """One float gene per parameter: values (Float, Int, choice index) ↔ pymoo's X rows."""

    def __init__(self, params: Sequence[Param]) -> None:
        self.params = list(params)
        floats = [isinstance(p, FloatParam) for p in self.params]
        bounds = np.array([_gene_bounds(p) for p in self.params], dtype=float).reshape(-1, 2)
        self.lo, self.hi = bounds[:, 0], bounds[:, 1]
        self.rounded = ~np.array(floats, dtype=bool)
        self.steps = np.array([p.step if f and p.step and not p.log else 0.0 for p, f in zip(self.params, floats)],
                              dtype=float)
        # pymoo's bounds: rounded genes get half a unit on each side, so that every integer
        # (every choice) is equally likely under uniform sampling and mutation; a fixed float
        # gene is widened because pymoo's operators divide by (xu - xl). Repair clips back.
        self.xl = np.where(self.rounded, self.lo - 0.5, self.lo)
        self.xu = np.where(self.rounded, self.hi + 0.5, np.where(self.hi > self.lo, self.hi, self.lo + 1.0))

    def repair(self, X: np.ndarray) -> np.ndarray:
        """Round integer/choice genes, snap stepped floats to their grid, clip to the true bounds."""
        X = np.array(X, dtype=float, copy=True)
        X = np.where(np.isfinite(X), X, self.lo)
        X[:, self.rounded] = np.round(X[:, self.rounded])
        stepped = self.steps > 0
        if stepped.any():
            lo, step = self.lo[stepped], self.steps[stepped]
            X[:, stepped] = lo + np.round((X[:, stepped] - lo) / step) * step
        return np.clip(X, self.lo, self.hi)

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        """Parameter values (plain Python types) of one repaired X row."""
        out: dict[str, Any] = {}
        for p, v in zip(self.params, x):
            if isinstance(p, FloatParam):
                out[p.name] = float(p.clip(math.exp(v) if p.log else v))
            elif isinstance(p, IntParam):
                out[p.name] = p.clip(v)
            else:
                out[p.name] = p.choices[int(min(len(p.choices) - 1, max(0, round(float(v)))))]
        return out

    def encode(self, values: Mapping[str, Any], default) -> np.ndarray:
        """X row of parameter values (a missing one takes ``default(param)``)."""
        row = []
        for p in self.params:
            v = values[p.name] if p.name in values else default(p)
            if isinstance(p, FloatParam):
                v = p.clip(v)
                row.append(math.log(v) if p.log else float(v))
            elif isinstance(p, IntParam):
                row.append(float(p.clip(v)))
            else:
                row.append(float(p.choices.index(p.clip(v))))
        return np.array(row, dtype=float)


def _gene_bounds(p: Param) -> tuple[float, float]:
    """A gene's range: [low, high] (log scale for log floats), or [0, len - 1] for a choice index."""
    if isinstance(p, FloatParam):
        return (math.log(p.low), math.log(p.high)) if p.log else (p.low, p.high)
    return (p.low, p.high) if isinstance(p, IntParam) else (0, len(p.choices) - 1)


@dataclass(eq=False)
class _Slot:
    """One individual of the generation in progress."""

    x: np.ndarray | None  # None: reserved for the next WAITING trial (a warm start)
    number: int | None = None
    trial_id: int | None = None
    score: tuple[np.ndarray, float] | None = None


class PymooNSGA3Sampler(Sampler):
    """NSGA-III (Deb & Jain 2014) from pymoo, generation by generation, mirrored into Optuna.

    Each parameter of the space is one float gene: a float on [low, high] (log scale if the
    parameter is), an integer on [low, high], a choice as its index on [0, len - 1]. A repair
    rounds the discrete genes (and snaps stepped floats to their grid), so what pymoo ranks is
    exactly what was scored. Variation is SBX crossover and polynomial mutation with a small
    distribution index (eta = 3, pymoo's advice for rounded integer genes), so that rounded genes
    actually move. A choice gene is its index on the (sorted) choices, so KV bit-widths mutate along
    the ladder: a neighbouring rung is likelier than a far one (ordinal levels, not categorical
    resampling). Under a KV budget (``kv.budget`` / ``kv.budget_bytes``) the repair also fits the
    widths to it (:meth:`SearchSpace.snap_kv`), so pymoo ranks the widths that were scored. The reference directions are Das-Dennis with the largest number of partitions
    whose count fits in ``spec.population_size`` (one direction for a single objective: NSGA-III
    then reduces to an elitist GA with constrained tournament selection).

    Lifecycle:
        construction → read population size and seed from ``space.spec`` and the objective count
        from ``study.directions``; rebuild the population from the stored trials that carry a
        ``generation`` attr (resume), else start fresh.

        ask(n) → first pop WAITING trials (warm starts, re-queued orphans) into the current
        generation (the first generation is topped up with pymoo's random sampling to
        ``population_size``); then, for each individual not yet handed out,
        ``study.enqueue_trial(params, user_attrs={"generation": g, "source": "pymoo-nsga3"})``
        and ``study.ask(fixed_distributions)`` → a RUNNING trial with exactly those params.
        Returns fewer than ``n`` (possibly none) when the rest of the generation is in flight:
        NSGA-III is generational.

        tell(number, outcome) → ``Sampler.finish`` into the store; F = values, G = 0 for a
        complete trial, F = :data:`FAILED_PENALTY` per objective and G = :data:`FAILED_VIOLATION`
        for a failed or pruned one. When every individual of the generation is told:
        ``algorithm.evaluator.eval(StaticProblem(problem, F=F, G=G), pop)``,
        ``algorithm.tell(infills=pop)`` and the next ``algorithm.ask()`` becomes generation g + 1.
        A second tell of the same number is ignored.

        resume → the algorithm object is not stored. A new sampler takes the latest finished
        individuals (at most :data:`REBUILD_POPULATIONS` × population size; orphaned ones that
        were re-queued are skipped), rebuilds X from their params, F from their values and G
        from their state, keeps NSGA-III's survivors and hands them to ``NSGA3(sampling=pop)``
        as pre-evaluated individuals; its next generation index is one above the largest stored.

    Args:
        study: The study (created by :func:`sparsealloc.search.session.open_sampler`).
        space: The search space; ``space.spec`` supplies ``population_size`` and ``seed``.
    """

    name = "nsga3"
    crossover_prob = 0.9
    crossover_eta = 3.0
    mutation_eta = 3.0

    def __init__(self, study: optuna.Study, space: SearchSpace) -> None:
        super().__init__(study, space)
        spec = space.spec
        self.n_objectives = len(study.directions)
        self.ref_dirs = reference_directions(self.n_objectives, spec.population_size)
        self.population_size = max(int(spec.population_size), len(self.ref_dirs))
        self.seed = int(spec.seed)
        self.codec = _Codec(space.params)
        self.problem = Problem(n_var=len(space.params), n_obj=self.n_objectives, n_ieq_constr=1,
                               xl=self.codec.xl, xu=self.codec.xu)
        self.generation = 0
        self.algorithm: NSGA3 | None = None
        self._slots: list[_Slot] | None = None  # the generation in progress
        self._member: dict[int, _Slot] = {}  # trial number → its slot, until told
        self._rebuild()

    # ------------------------------------------------------------------------------ ask
    def ask(self, n: int = 1) -> list[Proposal]:
        """Up to ``n`` individuals of the current generation as RUNNING trials (see Lifecycle)."""
        out: list[Proposal] = []
        if n <= 0:
            return out
        waiting = len(self._waiting())
        if self._slots is None:
            self._start_generation(n_waiting=waiting)
        else:
            self._drop_vanished_reservations(waiting)
        while len(out) < n:
            if waiting:  # WAITING trials first: Optuna pops the oldest on every ask
                waiting -= 1
                out.append(self._adopt(self.study.ask(fixed_distributions=self.distributions)))
                continue
            slot = next((s for s in self._slots if s.number is None and s.x is not None), None)
            if slot is None:
                break  # generation barrier: the rest is in flight
            out.extend(self._ask_individual(slot))
        return out

    def _waiting(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    def _ask_individual(self, slot: _Slot) -> list[Proposal]:
        params = self.codec.decode(slot.x)
        self.study.enqueue_trial(params, user_attrs={GENERATION: self.generation, SOURCE_KEY: SOURCE})
        out: list[Proposal] = []
        while True:
            trial = self.study.ask(fixed_distributions=self.distributions)
            attrs = trial.user_attrs
            if attrs.get(SOURCE_KEY) == SOURCE and attrs.get(GENERATION) == self.generation \
                    and WARM_START not in attrs and RETRY_OF not in attrs:
                break
            # Someone else enqueued in between (the single-writer design rules this out): the
            # popped trial joins this generation too.
            out.append(self._adopt(trial))
        slot.number, slot.trial_id = trial.number, trial_id_of(trial)
        self._member[trial.number] = slot
        out.append(Proposal(trial.number, dict(trial.params), dict(trial.user_attrs)))
        return out

    def _adopt(self, trial: optuna.Trial) -> Proposal:
        """A popped WAITING trial fills a reserved slot of this generation (or an extra one)."""
        set_trial_user_attr(self.study, trial_id_of(trial), GENERATION, self.generation)
        set_trial_user_attr(self.study, trial_id_of(trial), SOURCE_KEY, SOURCE)
        slot = next((s for s in self._slots if s.x is None), None)
        if slot is None:
            slot = _Slot(None)
            self._slots.append(slot)
        slot.x = self.codec.encode(trial.params, self.space.default)
        slot.number, slot.trial_id = trial.number, trial_id_of(trial)
        self._member[trial.number] = slot
        attrs = {**trial.user_attrs, GENERATION: self.generation, SOURCE_KEY: SOURCE}
        return Proposal(trial.number, dict(trial.params), attrs)

    def _drop_vanished_reservations(self, waiting: int) -> None:
        """Forget reserved slots whose WAITING trials are gone (popped by another process)."""
        reserved = [s for s in self._slots if s.x is None]
        for slot in reserved[waiting:]:
            self._slots.remove(slot)
        if reserved[waiting:] and all(s.score is not None for s in self._slots):
            self._advance()
            self._start_generation()

    # ------------------------------------------------------------------------------ tell
    def tell(self, trial_number: int, outcome: Outcome) -> None:
        """Finish the trial in the store and score its individual; idempotent."""
        slot = self._member.get(trial_number)
        if slot is None:
            return  # already told, or not an individual of this sampler
        self.finish(self.study, slot.trial_id, trial_number, outcome)
        del self._member[trial_number]
        slot.score = self._score(outcome.state, outcome.values)
        if all(s.score is not None for s in self._slots):
            self._advance()

    def _score(self, state: str, values: Sequence[float] | None) -> tuple[np.ndarray, float]:
        if state == "complete" and values is not None and len(values) == self.n_objectives \
                and all(math.isfinite(float(v)) for v in values):
            return np.array([float(v) for v in values]), 0.0
        return np.full(self.n_objectives, FAILED_PENALTY), FAILED_VIOLATION

    def _advance(self) -> None:
        """Every individual is scored: hand the generation to pymoo."""
        if self._slots:
            pop = Population.new("X", np.stack([s.x for s in self._slots]))
            F = np.stack([s.score[0] for s in self._slots])
            G = np.array([[s.score[1]] for s in self._slots])
            self.algorithm.evaluator.eval(StaticProblem(self.problem, F=F, G=G), pop)
            self.algorithm.tell(infills=pop)
            self.generation += 1
        self._slots = None

    # ------------------------------------------------------------------------------ generations
    def _repair(self, X: np.ndarray) -> np.ndarray:
        """The codec's repair, then each row's KV widths fitted to the KV budget (when there is one)."""
        X = self.codec.repair(X)
        if self.space.kv_total is None:
            return X
        return np.stack([self.codec.encode(self.space.snap_kv(self.codec.decode(x)), self.space.default) for x in X])

    def _new_algorithm(self, sampling=None) -> NSGA3:
        kwargs = {} if sampling is None else {"sampling": sampling}
        algorithm = NSGA3(ref_dirs=self.ref_dirs, pop_size=self.population_size,
                          crossover=SBX(prob=self.crossover_prob, eta=self.crossover_eta),
                          mutation=PM(eta=self.mutation_eta),
                          repair=pymoo_repair(self._repair), eliminate_duplicates=True, **kwargs)
        # Seeded by (seed, generation): a resumed study does not replay the randomness of its start.
        algorithm.setup(self.problem, termination=NoTermination(), seed=self._derived_seed())
        return algorithm

    def _derived_seed(self) -> int:
        return int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.generation]).generate_state(1)[0])

    def _start_generation(self, n_waiting: int = 0) -> None:
        """Slots of the next generation: one per WAITING trial (the first generation only), then
        pymoo's individuals (the first generation is random, topped up to ``population_size``)."""
        if self.algorithm is None:
            self.algorithm = self._new_algorithm()
            X = self.algorithm.ask().get("X")[: max(0, self.population_size - n_waiting)]
            reserved = n_waiting
        else:
            pop = self.algorithm.ask()
            if pop is None or len(pop) == 0:
                # Mating found no unique offspring (a tiny discrete space): sample at random.
                self.algorithm.termination.force_termination = False
                pop = FloatRandomSampling()(self.problem, self.population_size,
                                            random_state=self.algorithm.random_state)
            X = self._repair(pop.get("X"))
            reserved = 0
        self._slots = [_Slot(None) for _ in range(reserved)] + [_Slot(x) for x in X]
        self._member = {}

    def _rebuild(self) -> None:
        """Resume: the population from the latest finished individuals in the store."""
        trials = self.study.get_trials(deepcopy=False)
        generations = [t.user_attrs[GENERATION] for t in trials if GENERATION in t.user_attrs]
        if not generations:
            return
        self.generation = int(max(generations)) + 1
        retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
        finished = [t for t in trials if GENERATION in t.user_attrs and t.number not in retried
                    and t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)]
        finished = finished[-REBUILD_POPULATIONS * self.population_size:]
        if not finished:
            self.algorithm = None
            return
        X = np.stack([self.codec.encode(t.params, self.space.default) for t in finished])
        scores = [self._score("complete" if t.state == TrialState.COMPLETE else "failed", t.values)
                  for t in finished]
        F = np.stack([s[0] for s in scores])
        G = np.array([[s[1]] for s in scores])
        pop = Population.new("X", X)
        Evaluator().eval(StaticProblem(self.problem, F=F, G=G), pop)
        survivors = ReferenceDirectionSurvival(self.ref_dirs).do(
            self.problem, pop, n_survive=self.population_size,
            random_state=np.random.default_rng(self._derived_seed()))
        self.algorithm = self._new_algorithm(sampling=survivors)
        initial = self.algorithm.ask()  # the pre-evaluated survivors: nothing to score
        self.algorithm.evaluator.eval(self.problem, initial)
        self.algorithm.tell(infills=initial)
        logger.info("nsga3: rebuilt a population of %d from %d stored trials; next generation %d",
                    len(self.algorithm.pop), len(finished), self.generation)
