"""The sampler contract (``sparsealloc.search.samplers.base``), once, for every registered sampler.

Each test runs for every name in ``SAMPLERS`` with one and with two objectives, on a synthetic
layerwise + KV-bits space (6 blocks × 2 Linear layers of different sizes) and a SQLite store.
The evaluator is a cheap function of the decoded candidate: no model is involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.core.plan import AllocationPlan
from sparsealloc.core.types import Outcome
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.orchestrator import run_study
from sparsealloc.search.samplers.base import SAMPLERS, Sampler
from sparsealloc.search.session import open_sampler
from sparsealloc.spaces.params import ChoiceParam, FloatParam, IntParam
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import SINGLE_OBJECTIVE_SAMPLERS, EvoSpec, KVSpec, StudySpec
from sparsealloc.storage.export import export_study
from sparsealloc.storage.rdb import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

TARGET = 0.5
POPULATION = 6
OBJECTIVES = {1: ("reconstruction",), 2: ("reconstruction", "kv_bytes")}
CASES = [(name, n_obj) for name in SAMPLERS.names() for n_obj in (1, 2)
         if n_obj == 1 or name not in SINGLE_OBJECTIVE_SAMPLERS]


# ----------------------------------------------------------------------------------- fixtures
#: Per block a small q_proj and a larger down_proj, both growing with depth (:func:`growth`).
SIZES = {"self_attn.q_proj": 64 * 64, "mlp.down_proj": 64 * 172}


def growth(block: int) -> int:
    return 1 + block % 3


@pytest.fixture(scope="module")
def layout(layout_builder):
    return layout_builder(6, SIZES, growth)


#: evo with one selection stage on the whole window pool (calibration.samples, 16): every trial is
#: scored on all windows, as the other samplers' are.
EVO_ONE_STAGE = EvoSpec(offspring=POPULATION, stages=((16, 1),))


def make_spec(name: str, sampler: str, n_obj: int, trials: int = 10) -> StudySpec:
    return StudySpec(name=name, target_sparsity=TARGET, space=("layerwise", "kv"), objectives=OBJECTIVES[n_obj],
                     sampler=sampler, population_size=POPULATION, trials=trials, seed=3,
                     kv=KVSpec(bits=(2, 4, 8, 16), separate_kv=False), warm_start=("uniform",), evo=EVO_ONE_STAGE)


def weighted_mean(sparsity, numels) -> float:
    return sum(sparsity[n] * numels[n] for n in sparsity) / sum(numels[n] for n in sparsity)


class SyntheticEvaluator:
    """Objectives from the decoded candidate: weighted variance of the ratios plus an error for
    low KV bits (first objective), mean KV bits (second). Records every decoded budget."""

    def __init__(self, space: SearchSpace, n_obj: int, fail_every: int = 0) -> None:
        self.space, self.n_obj, self.fail_every = space, n_obj, fail_every
        self.calls = 0
        self.budgets: list[float] = []

    def __call__(self, params, windows=None) -> Outcome:
        self.calls += 1
        decoded = self.space.decode(params)
        numels = self.space.layout.numels
        mean = weighted_mean(decoded.sparsity, numels)
        self.budgets.append(mean)
        if self.fail_every and self.calls % self.fail_every == 0:
            return Outcome("failed", reason="objective is NaN")
        variance = sum(numels[n] * (r - mean) ** 2 for n, r in decoded.sparsity.items()) / sum(numels.values())
        bits = [b for kv in decoded.kv_bits.values() for b in kv.values()]
        error = variance + 0.01 * sum(16 / b for b in bits) / len(bits)
        values = (error, sum(bits) / len(bits) / 16)[: self.n_obj]
        plan = decoded.to_plan(model={"name": "fake"})
        return Outcome("complete", values=values, attrs={"plan": plan.to_dict(), "achieved_sparsity": mean})


@dataclass
class Case:
    name: str
    n_obj: int
    url: str
    spec: StudySpec
    space: SearchSpace
    sampler: Sampler

    @property
    def study(self) -> optuna.Study:
        return self.sampler.study

    def reopen(self) -> Sampler:
        """A new sampler object on the same study, through a fresh storage object (resume)."""
        return open_sampler(self.spec, open_storage(self.url), self.space)

    def values(self, x: float = 1.0) -> tuple[float, ...]:
        return tuple(x + i for i in range(self.n_obj))

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self.study.get_trials(deepcopy=False)[number]


@pytest.fixture(params=CASES, ids=[f"{name}-{n}obj" for name, n in CASES])
def case(request, store_url, layout) -> Case:
    name, n_obj = request.param
    spec = make_spec(request.node.name, name, n_obj)
    space = SearchSpace(spec, layout)
    sampler = open_sampler(spec, open_storage(store_url), space)
    assert type(sampler) is SAMPLERS.get(name)
    return Case(name, n_obj, store_url, spec, space, sampler)


def assert_in_space(space: SearchSpace, params) -> None:
    assert set(params) == {p.name for p in space.params}
    for p in space.params:
        value = params[p.name]
        if isinstance(p, FloatParam):
            assert isinstance(value, float) and p.low <= value <= p.high, (p, value)
        elif isinstance(p, IntParam):
            assert isinstance(value, int) and p.low <= value <= p.high, (p, value)
        else:
            assert isinstance(p, ChoiceParam)
            assert value in p.choices, (p, value)
            assert type(value) is type(p.choices[0]), (p, value)  # numeric choices keep their type


def drain(sampler: Sampler, case: Case, n: int) -> list[int]:
    """Ask and complete ``n`` trials one by one; their numbers."""
    numbers = []
    while len(numbers) < n:
        proposals = sampler.ask(1)
        assert proposals, "ask returned nothing while nothing was in flight"
        for p in proposals:
            sampler.tell(p.trial_number, Outcome("complete", values=case.values(float(p.trial_number))))
            numbers.append(p.trial_number)
    return numbers


# ----------------------------------------------------------------------------------- the contract
def test_ask_records_running_trials_within_the_space(case):
    proposals = case.sampler.ask(3)
    assert 1 <= len(proposals) <= 3
    assert len({p.trial_number for p in proposals}) == len(proposals)
    for p in proposals:
        assert_in_space(case.space, p.params)
        trial = case.trial(p.trial_number)
        assert trial.state == TrialState.RUNNING
        assert trial.params == dict(p.params)
    if case.name == "nsga3":
        assert all(p.attrs["generation"] == 0 and p.attrs["source"] == "pymoo-nsga3" for p in proposals)


def test_tell_complete_failed_and_pruned(case):
    first, second, third = (case.sampler.ask(1)[0] for _ in range(3))
    case.sampler.tell(first.trial_number, Outcome("complete", values=case.values(0.25), attrs={"note": "ok"}))
    case.sampler.tell(second.trial_number, Outcome("failed", reason="objective is NaN"))
    case.sampler.tell(third.trial_number, Outcome("pruned", intermediate=((0, 1.5),)))
    done = case.trial(first.trial_number)
    assert done.state == TrialState.COMPLETE and done.values == list(case.values(0.25))
    assert done.user_attrs["note"] == "ok"
    failed = case.trial(second.trial_number)
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "objective is NaN"
    pruned = case.trial(third.trial_number)
    assert pruned.state == TrialState.PRUNED and pruned.intermediate_values == {0: 1.5}
    # The study goes on after a failure.
    more = case.sampler.ask(2)
    assert more and all(case.trial(p.trial_number).state == TrialState.RUNNING for p in more)


def test_tell_twice_is_a_no_op(case):
    proposal = case.sampler.ask(1)[0]
    case.sampler.tell(proposal.trial_number, Outcome("complete", values=case.values(1.0)))
    case.sampler.tell(proposal.trial_number, Outcome("complete", values=case.values(9.0)))
    case.sampler.tell(proposal.trial_number, Outcome("failed", reason="late duplicate"))
    trial = case.trial(proposal.trial_number)
    assert trial.state == TrialState.COMPLETE and trial.values == list(case.values(1.0))
    assert "fail_reason" not in trial.user_attrs
    assert case.sampler.ask(1)


def test_warm_starts_are_asked_first(case):
    uniform = case.space.defaults()
    ramp = {n: 0.3 + 0.4 * i / 11 for i, n in enumerate(case.space.layout.linears)}
    shaped = case.space.encode_sparsity(ramp)
    shaped["kv_bits/layer_00"] = 5  # snapped to a choice (4) by enqueue
    case.sampler.enqueue(uniform, "uniform")
    case.sampler.enqueue(shaped, "depth_ramp")
    asked = [case.sampler.ask(1)[0] for _ in range(2)]
    assert [p.attrs["warm_start"] for p in asked] == ["uniform", "depth_ramp"]
    assert asked[0].params == uniform
    expected = {**shaped, "kv_bits/layer_00": 4}
    assert asked[1].params == expected
    assert type(asked[1].params["kv_bits/layer_00"]) is int
    for p in asked:
        assert case.trial(p.trial_number).state == TrialState.RUNNING
        case.sampler.tell(p.trial_number, Outcome("complete", values=case.values()))
    if case.name == "nsga3":  # warm starts are individuals of the first generation
        assert [case.trial(p.trial_number).user_attrs["generation"] for p in asked] == [0, 0]
    assert not case.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert case.sampler.ask(1)


def test_resume_with_a_new_sampler_object(case):
    first = drain(case.sampler, case, POPULATION + 2)  # into the second generation for nsga3
    resumed = case.reopen()
    assert resumed is not case.sampler
    second = drain(resumed, case, 4)
    assert min(second) > max(first)
    trials = case.reopen().study.get_trials(deepcopy=False)
    assert len(trials) == len(first) + len(second)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    if case.name == "nsga3":
        before = max(trials[n].user_attrs["generation"] for n in first)
        after = [trials[n].user_attrs["generation"] for n in second]
        assert before == 1
        assert min(after) == before + 1  # the generation index continues
        assert resumed.generation >= before + 1


def test_run_study_meets_the_budget_exactly(case):
    evaluator = SyntheticEvaluator(case.space, case.n_obj, fail_every=4)
    case.sampler.enqueue(case.space.defaults(), "uniform")
    n_trials = 9
    run = run_study(case.sampler, LocalDispatcher(evaluator), n_trials)
    study = case.study
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == n_trials
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert run.told["complete"] == n_trials and run.told["failed"] == len(failed) >= 2
    assert all(t.user_attrs["fail_reason"] == "objective is NaN" for t in failed)
    assert evaluator.calls == n_trials + len(failed)
    assert all(abs(mean - TARGET) < 1e-9 for mean in evaluator.budgets)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        assert_in_space(case.space, trial.params)
        assert abs(weighted_mean(case.space.decode(trial.params).sparsity, case.space.layout.numels) - TARGET) < 1e-9
    assert study.get_trials(deepcopy=False)[0].user_attrs["warm_start"] == "uniform"


def test_export_writes_the_non_dominated_set(case, tmp_path):
    run_study(case.sampler, LocalDispatcher(SyntheticEvaluator(case.space, case.n_obj)), 8)
    paths = export_study(case.study, tmp_path / "export")
    plans = [AllocationPlan.load(p) for p in paths]
    complete = case.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for plan in plans:
        assert abs(weighted_mean(plan.sparsity, case.space.layout.numels) - TARGET) < 1e-9
        assert plan.provenance["sampler"] == case.name
    if case.n_obj == 1:
        assert [p.name for p in paths] == ["best.json"]
        assert plans[0].provenance["values"][0] == min(t.values[0] for t in complete)
        return
    assert all(p.parent.name == "pareto" for p in paths) and plans

    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    front = [tuple(p.provenance["values"]) for p in plans]
    assert not any(dominates(a, b) for a in front for b in front)
    everything = [tuple(t.values) for t in complete]
    expected = {v for v in everything if not any(dominates(o, v) for o in everything)}
    assert set(front) == expected
    assert all(math.isfinite(v) for values in front for v in values)


def test_a_tiny_discrete_space_never_stalls(case, store_url, layout_builder):
    """Four possible candidates, more trials than that: duplicates are fine, a stall is not."""
    spec = StudySpec(name=f"{case.spec.name}-tiny", target_sparsity=TARGET, space=("kv",),
                     objectives=OBJECTIVES[case.n_obj], sampler=case.name, population_size=POPULATION,
                     seed=1, kv=KVSpec(bits=(8, 16), separate_kv=False), evo=EVO_ONE_STAGE)
    space = SearchSpace(spec, layout_builder(2, SIZES, growth))
    sampler = open_sampler(spec, open_storage(store_url), space)
    run_study(sampler, LocalDispatcher(SyntheticEvaluator(space, case.n_obj)), 10)
    complete = sampler.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(complete) == 10
    assert {tuple(sorted(t.params.items())) for t in complete} <= {
        (("kv_bits/layer_00", a), ("kv_bits/layer_01", b)) for a in (8, 16) for b in (8, 16)}


# ----------------------------------------------------------------------------------- nsga3 specifics
@pytest.mark.parametrize(("n_obj", "population", "count"), [(1, 6, 1), (2, 6, 6), (3, 24, 21), (4, 3, 4)])
def test_nsga3_reference_directions_fit_the_population(n_obj, population, count):
    from sparsealloc.search.samplers.pymoo_nsga3 import reference_directions

    dirs = reference_directions(n_obj, population)
    assert dirs.shape == (count, n_obj)
    assert abs(dirs.sum(axis=1) - 1).max() < 1e-12


@pytest.fixture
def nsga3(store_url, request, layout) -> Case:
    spec = make_spec(request.node.name, "nsga3", 2)
    space = SearchSpace(spec, layout)
    return Case("nsga3", 2, store_url, spec, space, open_sampler(spec, open_storage(store_url), space))


def test_nsga3_a_failed_generation_still_advances(nsga3):
    first = nsga3.sampler.ask(POPULATION + 3)
    assert len(first) == POPULATION  # the generation barrier
    assert nsga3.sampler.ask(1) == []
    for p in first:
        nsga3.sampler.tell(p.trial_number, Outcome("failed", reason="worker died"))
    second = nsga3.sampler.ask(2)
    assert [p.attrs["generation"] for p in second] == [1, 1]


def test_nsga3_resume_rebuilds_the_population_from_the_store(nsga3):
    numbers = drain(nsga3.sampler, nsga3, 2 * POPULATION)
    trials = nsga3.study.get_trials(deepcopy=False)
    # Trial n scored (n, n + 1): trial 0 dominates all; it must survive the rebuild.
    resumed = nsga3.reopen()
    assert resumed.generation == 2
    X = resumed.algorithm.pop.get("X")
    assert 1 <= len(X) <= POPULATION
    stored = {tuple(resumed.codec.encode(trials[n].params, resumed.space.default)) for n in numbers}
    assert all(tuple(x) in stored for x in X)
    best = tuple(resumed.codec.encode(trials[0].params, resumed.space.default))
    assert best in {tuple(x) for x in X}
    assert resumed.ask(1)[0].attrs["generation"] == 2
