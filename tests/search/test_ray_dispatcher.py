"""Ray dispatcher against a real local Ray cluster (marked ``ray``; one module-scoped runtime)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

ray = pytest.importorskip("ray")

from sparsealloc.core.types import Proposal  # noqa: E402
from sparsealloc.search.dispatch.ray_pool import RayDispatcher, ScorerActor  # noqa: E402
from sparsealloc.search.orchestrator import run_study  # noqa: E402
from sparsealloc.search.session import build_evaluator, open_sampler  # noqa: E402
from sparsealloc.spaces.spec import StudySpec  # noqa: E402
from sparsealloc.storage.rdb import open_storage  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _spec(model_dir, text_file, name, trials):
    return StudySpec.from_dict({
        "name": name, "model": str(model_dir), "target_sparsity": 0.5, "trials": trials,
        "calibration": {"text": str(text_file), "samples": 4, "seq_len": 16, "batch_size": 2},
        "warm_start": [], "device": "cpu"})


def test_study_with_two_workers_completes(ray_runtime, tiny_llama_dir, text_file, tmp_path):
    spec = _spec(tiny_llama_dir, text_file, "ray-two", 20)
    evaluator = build_evaluator(spec)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    sampler = open_sampler(spec, storage, evaluator.space)
    dispatcher = RayDispatcher(spec, evaluator.ctx.windows, workers=2)
    try:
        pids = set(ray.get([a.ping.remote() for a in dispatcher.actors]))
        assert len(pids) == 2
        run_study(sampler, dispatcher, spec.trials)
    finally:
        dispatcher.close()
    states = [t.state.name for t in sampler.study.trials]
    assert states.count("COMPLETE") == 20 and "RUNNING" not in states
    # Same candidate scored in-process and on a worker gives the same value.
    trial = sampler.study.best_trial
    local = evaluator(trial.params)
    assert local.values[0] == pytest.approx(trial.values[0], rel=1e-5)


def _best_on_one_worker_matches_the_driver(spec, tmp_path):
    """Run ``spec`` on one Ray worker built by ``for_study``; the best trial, after checking that the
    driver's evaluator scores it the same."""
    evaluator = build_evaluator(spec)
    sampler = open_sampler(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"), evaluator.space)
    dispatcher = RayDispatcher.for_study(spec, evaluator, workers=1)
    try:
        run_study(sampler, dispatcher, spec.trials)
    finally:
        dispatcher.close()
    trial = sampler.study.best_trial
    assert evaluator(trial.params).values[0] == pytest.approx(trial.values[0], rel=1e-5)
    return trial


def test_workers_score_on_the_held_out_windows_of_the_driver(ray_runtime, tiny_llama_dir, text_file, tmp_path):
    spec = StudySpec.from_dict({**_spec(tiny_llama_dir, text_file, "ray-held-out", 3).to_dict(),
                                "calibration": {"text": str(text_file), "samples": 4, "seq_len": 16, "batch_size": 2,
                                                "score_samples": 5}})
    trial = _best_on_one_worker_matches_the_driver(spec, tmp_path)
    on_statistics_windows = build_evaluator(_spec(tiny_llama_dir, text_file, "ray-held-out", 3))
    assert on_statistics_windows(trial.params).values[0] != pytest.approx(trial.values[0], rel=1e-3)


def test_workers_weigh_the_domains_of_the_driver(ray_runtime, tiny_llama_dir, text_file, tmp_path):
    words = text_file.read_text().split()
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(" ".join(words[: len(words) // 2]))
    second.write_text(" ".join(words[len(words) // 2:]))
    spec = StudySpec.from_dict({**_spec(tiny_llama_dir, text_file, "ray-domains", 3).to_dict(),
                                "calibration": {"domains": [str(first), str(second)], "domain_weights": [1, 4],
                                                "samples": 6, "seq_len": 16, "batch_size": 2}})
    trial = _best_on_one_worker_matches_the_driver(spec, tmp_path)
    unweighted = build_evaluator(spec.override(calibration=replace(spec.calibration, domain_weights=None)))
    assert unweighted(trial.params).values[0] != pytest.approx(trial.values[0], rel=1e-3)


def test_killed_worker_mid_study_every_trial_accounted(ray_runtime, tiny_llama_dir, text_file, tmp_path):
    spec = _spec(tiny_llama_dir, text_file, "ray-kill", 20)
    evaluator = build_evaluator(spec)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    sampler = open_sampler(spec, storage, evaluator.space)
    dispatcher = RayDispatcher(spec, evaluator.ctx.windows, workers=2, max_restarts=1)
    victim = dispatcher.actors[0]

    def kill_soon() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            done = [t for t in sampler.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
            if len(done) >= 4:
                ray.kill(victim, no_restart=False)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_soon, daemon=True)
    killer.start()
    try:
        run_study(sampler, dispatcher, spec.trials)
    finally:
        killer.join(timeout=5)
        dispatcher.close()
    states = [t.state.name for t in sampler.study.trials]
    assert states.count("COMPLETE") == 20
    assert "RUNNING" not in states and "WAITING" not in states
    # A kill between two tasks fails nothing (Ray queues calls for the restarting actor); a kill
    # mid-trial fails that trial with the reason and its parameters run once more.
    retried = {t.user_attrs["retry_of"]: t for t in sampler.study.trials if "retry_of" in t.user_attrs}
    for t in sampler.study.trials:
        if t.state.name == "FAIL":
            assert t.user_attrs["fail_reason"].startswith("worker died: "), t.user_attrs["fail_reason"]
            assert t.number in retried and retried[t.number].params == t.params


def _slow_scorer(seconds: float) -> type:
    """A ScorerActor whose trials take ``seconds`` longer: a kill then lands mid-trial for sure.

    Defined in a function so that Ray pickles it by value (test modules are not importable on workers).
    """

    class SlowScorer(ScorerActor):
        def score(self, params, windows=None):
            time.sleep(seconds)
            return super().score(params, windows)

    return SlowScorer


@pytest.mark.parametrize("restarts", [1, 0], ids=["restarted", "dead-for-good"])
def test_worker_killed_mid_trial_fails_it_and_retries_once(ray_runtime, tiny_llama_dir, text_file, tmp_path,
                                                           restarts):
    spec = _spec(tiny_llama_dir, text_file, f"ray-kill-mid-{restarts}", 20)
    evaluator = build_evaluator(spec)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    sampler = open_sampler(spec, storage, evaluator.space)
    dispatcher = RayDispatcher(spec, evaluator.ctx.windows, workers=2, max_restarts=restarts,
                               actor_body=_slow_scorer(0.6))
    victim = dispatcher.actors[0]
    killed: list[int] = []  # trial numbers in flight on the victim when it was killed

    def kill_mid_trial() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            done = [t for t in sampler.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
            on_victim = [p.trial_number for a, p in list(dispatcher._inflight.values()) if a is victim]
            if len(done) >= 4 and on_victim:
                time.sleep(0.2)  # well inside the 0.6 s trial
                killed.extend(on_victim)
                ray.kill(victim, no_restart=restarts == 0)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_trial, daemon=True)
    killer.start()
    try:
        run = run_study(sampler, dispatcher, spec.trials)
        # A restarted victim stays in the pool; one dead for good leaves it, and the other worker
        # finishes the study (before the fix it stayed and failed every trial handed to it).
        assert dispatcher.capacity == (2 if restarts else 1)
    finally:
        killer.join(timeout=5)
        dispatcher.close()
    trials = {t.number: t for t in sampler.study.trials}
    assert len(killed) == 1, "the killer never found a trial in flight on the victim"
    dead = trials[killed[0]]
    assert dead.state.name == "FAIL" and dead.user_attrs["fail_reason"].startswith("worker died: ")
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params and retries[0].state.name == "COMPLETE"
    assert run.retried == 1
    states = [t.state.name for t in trials.values()]
    assert states.count("COMPLETE") == 20 and states.count("FAIL") == 1
    assert "RUNNING" not in states and "WAITING" not in states


def test_study_stops_when_no_worker_is_left(ray_runtime, tiny_llama_dir, text_file, tmp_path):
    from sparsealloc.search.orchestrator import NoWorkersLeft

    spec = _spec(tiny_llama_dir, text_file, "ray-none-left", 10)
    evaluator = build_evaluator(spec)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    sampler = open_sampler(spec, storage, evaluator.space)
    dispatcher = RayDispatcher(spec, evaluator.ctx.windows, workers=1, max_restarts=0,
                               actor_body=_slow_scorer(0.6))
    victim = dispatcher.actors[0]
    threading.Timer(1.5, lambda: ray.kill(victim, no_restart=True)).start()
    try:
        with pytest.raises(NoWorkersLeft, match="no worker is left to score trials; last reason: worker died: "):
            run_study(sampler, dispatcher, spec.trials)
    finally:
        dispatcher.close()
    states = [t.state.name for t in sampler.study.trials]
    assert states.count("FAIL") == 1 and "RUNNING" not in states
    assert states.count("WAITING") == 1  # the dead trial's parameters, queued for a resume


def test_worker_fault_is_a_failed_outcome(ray_runtime, tiny_llama_dir, text_file):
    spec = _spec(tiny_llama_dir, text_file, "ray-fault", 1)
    evaluator = build_evaluator(spec)
    dispatcher = RayDispatcher(spec, evaluator.ctx.windows, workers=1)
    try:
        dispatcher.submit(Proposal(0, {"sparsity/no_such_param": 0.5}))
        (number, outcome), = dispatcher.wait(timeout=60)
    finally:
        dispatcher.close()
    assert number == 0 and outcome.state == "failed" and "unknown search parameters" in outcome.reason
