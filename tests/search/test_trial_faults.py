"""Trial faults on the real evaluator (tiny Llama): NaN and Inf objectives, out-of-memory and worker
exceptions become failed trials with a reason, the dense weights come back after each fault, the
study goes on to its budget, and a study where every trial fails stops with one clear line."""

from __future__ import annotations

import math
from unittest import mock

import optuna
import pytest
import torch
from optuna.trial import TrialState

from sparsealloc.cli.main import main
from sparsealloc.core.types import Proposal
from sparsealloc.objectives.base import OBJECTIVES
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.orchestrator import run_study
from sparsealloc.search.session import build_evaluator, open_sampler
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage.rdb import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def nan_objective(ctx, state):
    return float("nan")


def inf_objective(ctx, state):
    return float("inf")


def oom_objective(ctx, state):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def host_oom_objective(ctx, state):
    raise MemoryError("cannot allocate 8589934592 bytes")


def crashing_objective(ctx, state):
    raise RuntimeError("shape mismatch in layer 3\nsecond line of the message")


FAULTS = {
    "nan": (nan_objective, "objective hidden is not finite"),
    "inf": (inf_objective, "objective hidden is not finite"),
    "oom": (oom_objective, "out of memory: CUDA out of memory"),
    "host-oom": (host_oom_objective, "out of memory: cannot allocate"),
    "exception": (crashing_objective, "RuntimeError: shape mismatch in layer 3 second line of the message"),
}


@pytest.fixture(scope="module")
def evaluator(tiny_llama_dir, text_file):
    spec = StudySpec.from_dict({"name": "faults", "model": str(tiny_llama_dir), "target_sparsity": 0.5,
                                "sampler": "random", "calibration": {"text": str(text_file), "samples": 4,
                                                                     "seq_len": 16}})
    return build_evaluator(spec)


def dense_weights(evaluator) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in evaluator.ctx.model.named_parameters()}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_fails_the_trial_with_its_reason_and_restores_the_weights(fault, evaluator):
    function, reason = FAULTS[fault]
    values = evaluator.space.defaults()
    before = dense_weights(evaluator)
    good = evaluator(values)
    assert good.state == "complete" and math.isfinite(good.values[0])

    real = evaluator.objectives[0]
    evaluator.objectives[0] = function
    try:
        dispatcher = LocalDispatcher(evaluator)  # what catches a worker's exception
        dispatcher.submit(Proposal(0, values))
        (_, result), = dispatcher.wait()
    finally:
        evaluator.objectives[0] = real
    assert result.state == "failed"
    assert result.reason.startswith(reason), result.reason
    assert "\n" not in result.reason
    after = dense_weights(evaluator)
    assert all(torch.equal(before[n], after[n]) for n in before), "a fault left pruned weights behind"
    again = evaluator(values)
    assert again.state == "complete" and again.values == pytest.approx(good.values)


def test_the_study_goes_on_past_every_kind_of_fault(evaluator, tmp_path):
    """One fault of each kind between good trials: each is a FAIL with its reason; the budget is met."""
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    sampler = open_sampler(evaluator.spec, storage, evaluator.space)
    faults = [FAULTS[name] for name in sorted(FAULTS)]
    real = evaluator.objectives[0]
    calls = []

    def scripted(ctx, state):
        calls.append(1)
        index = len(calls) - 1
        if index % 2 == 1 and index // 2 < len(faults):  # trials 1, 3, 5, 7, 9 fault
            return faults[index // 2][0](ctx, state)
        return real(ctx, state)

    evaluator.objectives[0] = scripted
    try:
        run = run_study(sampler, LocalDispatcher(evaluator), n_trials=6)
    finally:
        evaluator.objectives[0] = real
    assert run.told == {"complete": 6, "failed": len(faults)}
    study = sampler.study
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    reasons = sorted(t.user_attrs["fail_reason"] for t in failed)
    expected = sorted(reason for _, reason in faults)
    assert [r[: len(e)] for r, e in zip(reasons, expected)] == expected
    assert all(math.isfinite(t.values[0]) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def test_a_study_where_every_trial_fails_stops_with_one_clear_line(tiny_llama_dir, text_file, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["--quiet", "study", "run", "--name", "doomed", "--storage", url, "--model", str(tiny_llama_dir),
            "--calib-text", str(text_file), "--calib-samples", "4", "--calib-seq-len", "16", "--trials", "20",
            "--no-validate"]
    with mock.patch.dict(OBJECTIVES._eager, {"hidden": nan_objective}):
        code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0] == "error: 5 trials in a row failed; last reason: objective hidden is not finite"
    assert "Traceback" not in captured.err + captured.out
    study = optuna.load_study(study_name="doomed", storage=url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL] * 5  # stopped: the 20-trial budget was not burnt on failures

    # the failures are visible afterwards, with their reasons
    assert main(["--quiet", "study", "show", "doomed", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "fail=5" in out and out.count("failed trial") == 5 and "objective hidden is not finite" in out
