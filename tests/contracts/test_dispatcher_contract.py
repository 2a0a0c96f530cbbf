"""The dispatcher contract (``sparsealloc.search.dispatch.base``), for every name in ``DISPATCHERS``.

Built as a study builds it (``for_study(spec, evaluator, **options)``), a dispatcher scores up to
``capacity`` proposals at once; ``wait`` hands each finished trial back exactly once, with the
values the evaluator gives in process; a fault of the candidate comes back as a failed outcome,
never as an exception; ``wait`` with nothing in flight returns at once; workers are reused.
"""

from __future__ import annotations

import time

import pytest

from sparsealloc.core.types import Proposal
from sparsealloc.search.dispatch.base import DISPATCHERS
from sparsealloc.search.session import build_evaluator
from sparsealloc.spaces.spec import StudySpec


def ray_runtime():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray.shutdown


#: What a dispatcher needs beyond the defaults: (pytest marks, keyword options, start its runtime → stop).
NEEDS = {"ray": ([pytest.mark.ray], {"workers": 2}, ray_runtime)}
NO_NEEDS = ([], {}, None)


@pytest.fixture(scope="module")
def study(tiny_llama_dir, text_file):
    spec = StudySpec.from_dict({
        "name": "dispatch", "model": str(tiny_llama_dir), "target_sparsity": 0.5, "warm_start": [], "device": "cpu",
        "calibration": {"text": str(text_file), "samples": 4, "seq_len": 16, "batch_size": 2}})
    return spec, build_evaluator(spec)


@pytest.fixture(params=[pytest.param(n, marks=NEEDS.get(n, NO_NEEDS)[0]) for n in DISPATCHERS.names()])
def dispatcher(request, study):
    _, options, runtime = NEEDS.get(request.param, NO_NEEDS)
    stop = runtime() if runtime else None
    made = DISPATCHERS.get(request.param).for_study(*study, **options)
    yield made
    made.close()
    if stop:
        stop()


def collect(dispatcher, n: int, seconds: float = 120) -> dict:
    deadline, out = time.monotonic() + seconds, {}
    while len(out) < n and time.monotonic() < deadline:
        for number, outcome in dispatcher.wait(timeout=max(0.0, deadline - time.monotonic())):
            assert number not in out, f"trial {number} returned twice"
            out[number] = outcome
    return out


def test_every_submitted_trial_comes_back_once_with_the_in_process_values(dispatcher, study):
    _, evaluator = study
    assert dispatcher.capacity >= 1 and dispatcher.in_flight == 0 and dispatcher.wait(timeout=0) == []
    for first in (0, dispatcher.capacity):  # twice: the workers are free again after a round
        candidates = {k: evaluator.space.encode_sparsity({n: 0.35 + 0.05 * ((int(n.split(".")[2]) + k) % 4)
                                                          for n in evaluator.ctx.layout.linears})
                      for k in range(first, first + dispatcher.capacity)}
        for number, values in candidates.items():
            dispatcher.submit(Proposal(number, values))
        outcomes = collect(dispatcher, len(candidates))
        assert set(outcomes) == set(candidates) and dispatcher.in_flight == 0
        for number, outcome in outcomes.items():
            assert outcome.state == "complete", outcome.reason
            assert outcome.values == pytest.approx(evaluator(candidates[number]).values, rel=1e-5)


def test_a_candidate_fault_is_a_failed_outcome(dispatcher):
    dispatcher.submit(Proposal(7, {"sparsity/no_such_param": 0.5}))
    (number, outcome), = collect(dispatcher, 1).items()
    assert number == 7 and outcome.state == "failed" and "unknown search parameters" in outcome.reason
