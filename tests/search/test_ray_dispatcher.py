"""Ray dispatcher against a real local Ray cluster (marked ``ray``; one module-scoped runtime)."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")

from sparsealloc.core.types import Proposal  # noqa: E402
from sparsealloc.search.dispatch.ray_pool import RayDispatcher  # noqa: E402
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
