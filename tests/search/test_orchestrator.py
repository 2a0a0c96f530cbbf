"""The study loop: failures are data, all-failing studies stop with the reason, crashes resume.

Synthetic space and evaluator (no model), SQLite store in a temporary folder.
"""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState

from sparsealloc.core.types import Outcome
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.orchestrator import AllTrialsFailed, best_value_text, run_study
from sparsealloc.search.samplers.base import SAMPLERS
from sparsealloc.search.session import open_sampler
from sparsealloc.spaces.space import SearchSpace
from sparsealloc.spaces.spec import EvoSpec, KVSpec, StudySpec
from sparsealloc.storage.rdb import open_storage, recover_orphans

optuna.logging.set_verbosity(optuna.logging.WARNING)

TARGET = 0.6


def weighted_mean(ratios, numels) -> float:
    return sum(ratios[n] * numels[n] for n in ratios) / sum(numels[n] for n in ratios)


class Evaluator:
    """Variance of the decoded ratios plus a KV-bits term; ``script`` decides what each call does:
    "ok", "fail" (a failed outcome), "died" (the failed outcome of a dead worker, ``retry=True``),
    "raise" (ValueError) or "crash" (a BaseException that kills the orchestrator, as a SIGKILL would)."""

    def __init__(self, space: SearchSpace, script=(), default: str = "ok") -> None:
        self.space, self.script, self.default = space, list(script), default
        self.calls = 0

    def __call__(self, params, windows=None) -> Outcome:
        action = self.script[self.calls] if self.calls < len(self.script) else self.default
        self.calls += 1
        if action == "crash":
            raise Crash()
        if action == "raise":
            raise ValueError(f"bad shape {self.calls}")
        if action == "fail":
            return Outcome("failed", reason="objective is NaN")
        if action == "died":
            return Outcome("failed", reason="worker died: the actor was killed", retry=True)
        decoded = self.space.decode(params)
        ratios = decoded.sparsity
        mean = weighted_mean(ratios, self.space.layout.numels)
        assert abs(mean - TARGET) < 1e-9
        variance = sum((r - mean) ** 2 for r in ratios.values()) / len(ratios)
        bits = [kv["k"] for kv in decoded.kv_bits.values()]
        return Outcome("complete", values=(variance + sum(1 / b for b in bits),))


class Crash(BaseException):
    """Stands for the orchestrator dying mid-trial."""


@pytest.fixture
def new_study(store_url, request, layout_builder):
    """Factory: sampler name → (spec, space, sampler) of a new study named after the test."""
    layout = layout_builder(4, {"self_attn.o_proj": 4096, "mlp.up_proj": 9216})

    def make(sampler: str):
        spec = StudySpec(name=request.node.name, target_sparsity=TARGET, space=("layerwise", "kv"),
                         sampler=sampler, population_size=4, seed=0, kv=KVSpec(bits=(4, 8, 16), separate_kv=False),
                         evo=EvoSpec(offspring=3, stages=((16, 1),)))  # one stage: every "ok" completes
        space = SearchSpace(spec, layout)
        return spec, space, open_sampler(spec, open_storage(store_url), space)

    return make


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.mark.parametrize("sampler_name", SAMPLERS.names())
def test_all_failing_trials_stop_the_study_with_the_reason(new_study, sampler_name):
    _, space, sampler = new_study(sampler_name)
    with pytest.raises(AllTrialsFailed, match="5 trials in a row failed; last reason: objective is NaN"):
        run_study(sampler, LocalDispatcher(Evaluator(space, default="fail")), n_trials=10)
    failed = sampler.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert len(failed) == 5 and states(sampler.study) == {"FAIL": 5}
    assert all(t.user_attrs["fail_reason"] == "objective is NaN" for t in failed)


@pytest.mark.parametrize("sampler_name", ["tpe", "nsga3"])
def test_an_exception_fails_that_trial_and_the_study_completes(new_study, sampler_name):
    _, space, sampler = new_study(sampler_name)
    run = run_study(sampler, LocalDispatcher(Evaluator(space, script=["ok", "raise", "raise", "ok"])), n_trials=5)
    assert run.told == {"complete": 5, "failed": 2}
    assert states(sampler.study) == {"COMPLETE": 5, "FAIL": 2}
    reasons = [t.user_attrs["fail_reason"] for t in sampler.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    assert reasons == ["ValueError: bad shape 2", "ValueError: bad shape 3"]
    assert run.last_failure == "ValueError: bad shape 3"


@pytest.mark.parametrize("sampler_name", ["tpe", "nsga3"])
def test_a_dead_worker_fails_its_trial_and_the_parameters_run_once_more(new_study, sampler_name):
    _, space, sampler = new_study(sampler_name)
    # trial 1's worker dies; its retry dies too (not queued a third time); trial 3's retry completes
    script = ["ok", "died", "died", "died", "ok", "ok", "ok"]
    run = run_study(sampler, LocalDispatcher(Evaluator(space, script=script)), n_trials=5)
    assert run.retried == 2 and run.told == {"complete": 5, "failed": 3}
    trials = sampler.study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in failed] == ["worker died: the actor was killed"] * 3
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    first, second, third = failed
    assert set(retries) == {first.number, third.number}  # the retry that died is not retried again
    assert retries[first.number] is second and second.params == first.params
    assert retries[third.number].state == TrialState.COMPLETE and retries[third.number].params == third.params
    assert states(sampler.study) == {"COMPLETE": 5, "FAIL": 3}


def test_failures_in_a_row_reset_after_a_success(new_study):
    _, space, sampler = new_study("random")
    script = ["fail", "fail", "ok", "fail", "fail", "ok", "fail", "fail"]
    run = run_study(sampler, LocalDispatcher(Evaluator(space, script=script)), n_trials=4, max_failures_in_a_row=3)
    assert run.told == {"complete": 4, "failed": 6}


@pytest.mark.parametrize("sampler_name", ["random", "nsga3"])
def test_recover_orphans_fails_and_requeues_running_trials(new_study, store_url, sampler_name):
    spec, space, sampler = new_study(sampler_name)
    done, orphan = sampler.ask(2)
    sampler.tell(done.trial_number, Outcome("complete", values=(1.0,)))
    del sampler  # the orchestrator dies with ``orphan`` RUNNING
    study = open_sampler(spec, open_storage(store_url), space).study
    assert recover_orphans(study) == [orphan.trial_number]
    trials = study.get_trials(deepcopy=False)
    failed = trials[orphan.trial_number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith("orphaned")
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].user_attrs["retry_of"] == orphan.trial_number
    if sampler_name == "nsga3":
        assert waiting[0].user_attrs["generation"] == 0
    assert recover_orphans(study) == []  # nothing RUNNING any more
    # The next sampler asks the re-queued copy first, with the same parameters.
    retry = open_sampler(spec, open_storage(store_url), space).ask(1)[0]
    assert retry.params == orphan.params and retry.trial_number == waiting[0].number
    assert retry.attrs["retry_of"] == orphan.trial_number


@pytest.mark.parametrize("sampler_name", SAMPLERS.names())
def test_resume_after_a_crash_reaches_exactly_the_budget(new_study, store_url, sampler_name):
    spec, space, sampler = new_study(sampler_name)
    sampler.enqueue(space.defaults(), "uniform")
    with pytest.raises(Crash):
        script = ["ok", "fail", "ok", "ok", "ok", "crash"]
        run_study(sampler, LocalDispatcher(Evaluator(space, script=script)), n_trials=9)
    assert states(sampler.study) == {"COMPLETE": 4, "FAIL": 1, "RUNNING": 1}
    # A new orchestrator process: open the store, recover, run to the same budget.
    resumed = open_sampler(spec, open_storage(store_url), space)
    assert len(recover_orphans(resumed.study)) == 1
    run = run_study(resumed, LocalDispatcher(Evaluator(space)), n_trials=9)
    assert run.told == {"complete": 5}
    assert states(resumed.study) == {"COMPLETE": 9, "FAIL": 2}
    trials = resumed.study.get_trials(deepcopy=False)
    retried = [t for t in trials if "retry_of" in t.user_attrs]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[retried[0].user_attrs["retry_of"]].params
    assert trials[0].user_attrs["warm_start"] == "uniform"
    if sampler_name == "nsga3":
        generations = [t.user_attrs["generation"] for t in trials]
        assert generations == sorted(generations) and generations[-1] >= 2


def test_a_timeout_stops_the_study_between_trials(new_study):
    _, space, sampler = new_study("random")
    evaluator = Evaluator(space)

    def slow(params):
        time.sleep(0.05)
        return evaluator(params)

    run = run_study(sampler, LocalDispatcher(slow), n_trials=50, timeout=0.12)
    assert 1 <= run.told["complete"] < 50
    assert states(sampler.study) == {"COMPLETE": run.told["complete"]}


def test_plain_trial_lines_count_down_to_the_timeout(monkeypatch, capsys):
    from types import SimpleNamespace

    from sparsealloc.core import progress
    from sparsealloc.search import orchestrator

    monkeypatch.setattr(orchestrator, "complete_count", lambda study: 0)
    clock = iter([0.0, 60.0, 120.0])
    monkeypatch.setattr(orchestrator.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress, "_MODE", "plain")
    bar = orchestrator._TrialBar(SimpleNamespace(), 100_000, "plain", timeout=150.0)
    bar.show(20, "0.5", 0)
    bar.show(40, "0.4", 0)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("1 min 00 s elapsed, about 1 min 30 s left")  # the timeout, not 100,000 trials
    assert lines[1].endswith("2 min 00 s elapsed, about 30 s left")


@pytest.mark.parametrize(("direction", "shown"), [("minimize", "-2.5"), ("maximize", "7")])
def test_the_progress_line_shows_the_best_value_in_the_study_direction(tmp_path, direction, shown):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'bar.db'}"), direction=direction)
    assert best_value_text(study) == "-"
    for value in (3.0, -2.5, 7.0):
        study.tell(study.ask(), value)
    study.ask()  # RUNNING: not counted
    assert best_value_text(study) == shown


def test_the_progress_line_of_a_multi_objective_study_counts_the_front(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'bar.db'}"),
                                directions=["minimize", "minimize"])
    assert best_value_text(study) == "-"
    for values in ((1.0, 2.0), (2.0, 1.0), (3.0, 3.0)):
        study.tell(study.ask(), values)
    assert best_value_text(study) == "pareto=2"
