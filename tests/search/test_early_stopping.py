"""Multi-fidelity trials: the study's pruner stops bad trials (PRUNED, with intermediate values).

A tiny random Llama, its calibration windows in 3 batches, a SQLite store in a temporary folder.
"""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

from sparsealloc.core.errors import SpecError
from sparsealloc.objectives import EvalContext, TrialEvaluator
from sparsealloc.search.dispatch.local import LocalDispatcher
from sparsealloc.search.orchestrator import run_study
from sparsealloc.search.session import open_sampler
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage.rdb import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_BATCHES = 3


@pytest.fixture
def ctx(model_builder, windows_builder):
    return EvalContext.build(model_builder("llama"), windows_builder(6, 16, seed=2), batch_size=2, layer_grams=True)


def _spec(name: str, **early) -> StudySpec:
    return StudySpec.from_dict({"name": name, "target_sparsity": 0.5, "layerwise": {"radius": 0.45},
                                "warm_start": [], "early_stopping": early})


def _candidates(evaluator: TrialEvaluator, n: int = 8) -> list[dict]:
    """Uniform plus seeded extreme allocations (block ratios at the ends of their ranges)."""
    gen = torch.Generator().manual_seed(0)
    out = [evaluator.space.defaults()]
    for _ in range(n):
        values = {}
        for p in evaluator.space.params:
            values[p.name] = p.low if bool(torch.rand((), generator=gen) < 0.5) else p.high
        out.append(values)
    return out


def _run(ctx, spec: StudySpec, first: dict, second: dict, store: str, n_trials: int = 2):
    evaluator = TrialEvaluator(ctx, spec)
    sampler = open_sampler(spec, open_storage(store), evaluator.space)
    sampler.enqueue(first, "good")
    sampler.enqueue(second, "bad")
    run = run_study(sampler, LocalDispatcher(evaluator), n_trials=n_trials)
    return sampler.study, run


def test_successive_halving_stops_a_bad_trial_at_the_gram_rung(ctx, tmp_path):
    spec = _spec("sh", pruner="successive_halving", reduction_factor=3, gram_rung=True)
    evaluator = TrialEvaluator(ctx, spec)
    rungs = [(evaluator.rung_value(evaluator.plan_for(v)), i) for i, v in enumerate(_candidates(evaluator))]
    (good_value, good), (bad_value, bad) = min(rungs), max(rungs)
    assert bad_value > good_value
    values = _candidates(evaluator)
    study, run = _run(ctx, spec, values[good], values[bad], f"sqlite:///{tmp_path / 's.db'}")

    trials = study.get_trials(deepcopy=False)
    first, second = trials[0], trials[1]
    assert first.state == TrialState.COMPLETE and first.user_attrs["warm_start"] == "good"
    assert sorted(first.intermediate_values) == list(range(1, 2 + N_BATCHES))  # rung + one per batch
    assert first.intermediate_values[1] == pytest.approx(good_value)
    assert first.intermediate_values[1 + N_BATCHES] == pytest.approx(first.values[0])
    assert second.state == TrialState.PRUNED and second.user_attrs["warm_start"] == "bad"
    assert second.intermediate_values == pytest.approx({1: bad_value})
    assert second.user_attrs["pruned_at_step"] == 1 and "plan" in second.user_attrs
    # the study went on: pruned trials do not count toward the COMPLETE budget
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 2
    assert len(trials) >= 3 and run.told["pruned"] >= 1
    for name, weight in ctx.pristine_weight.items():  # dense again after the study
        assert torch.equal(ctx.model.get_submodule(name).weight, weight)


def test_median_pruner_stops_a_bad_trial_after_a_batch(ctx, tmp_path):
    spec = _spec("median", pruner="median", startup_trials=1)
    evaluator = TrialEvaluator(ctx, spec)
    values = _candidates(evaluator)
    first_batch = []
    for i, v in enumerate(values):
        seen = []
        evaluator(v, report=lambda step, value: seen.append((step, value)) and False)
        first_batch.append((seen[0][1], i))
        assert [s for s, _ in seen] == list(range(1, 1 + N_BATCHES))  # no rung with the median pruner
    (good_value, good), (bad_value, bad) = min(first_batch), max(first_batch)
    study, _ = _run(ctx, spec, values[good], values[bad], f"sqlite:///{tmp_path / 'm.db'}")
    first, second = study.get_trials(deepcopy=False)[:2]
    assert first.state == TrialState.COMPLETE
    assert second.state == TrialState.PRUNED and second.intermediate_values == pytest.approx({1: bad_value})


def test_rung_stop_touches_no_weight_and_runs_no_forward(ctx, monkeypatch):
    evaluator = TrialEvaluator(ctx, _spec("rung", pruner="successive_halving", gram_rung=True))
    calls = []
    monkeypatch.setattr(type(ctx.model), "forward", lambda *a, **k: calls.append(1))
    outcome = evaluator(evaluator.space.defaults(), report=lambda step, value: True)
    assert outcome.state == "pruned" and [s for s, _ in outcome.intermediate] == [1]
    assert outcome.attrs["pruned_at_step"] == 1 and not calls


def test_the_last_step_is_never_stopped(ctx):
    evaluator = TrialEvaluator(ctx, _spec("last", pruner="median"))
    steps = []

    def stop_late(step, value):
        steps.append(step)
        return step == N_BATCHES  # "stop" only when the work is already done

    outcome = evaluator(evaluator.space.defaults(), report=stop_late)
    assert outcome.state == "complete" and steps == [1, 2, 3]
    stopped = evaluator(evaluator.space.defaults(), report=lambda step, value: step == 2)
    assert stopped.state == "pruned" and [s for s, _ in stopped.intermediate] == [1, 2]


@pytest.mark.parametrize(("changes", "needle"), [
    ({"objectives": ["kl", "kv_bytes"], "space": ["layerwise", "kv"]}, "single-objective"),
    ({"sampler": "nsga3"}, "sampler tpe or random"),
    ({"objectives": ["layer_local"]}, "forward proxy"),
    ({"early_stopping": {"pruner": "median", "gram_rung": True}}, "gram_rung needs pruner successive_halving"),
    ({"early_stopping": {"pruner": "hyperband"}}, "early_stopping.pruner must be one of"),
    ({"early_stopping": {"pruner": "successive_halving", "reduction_factor": 1}}, "reduction_factor"),
    ({"early_stopping": {"pruner": "median", "warmup_steps": -1}}, "warmup_steps"),
    ({"early_stopping": {"pruner": "median", "patience": 3}}, "accepts keys"),
])
def test_bad_early_stopping_specs_are_one_line_errors(changes, needle):
    data = {"early_stopping": {"pruner": "successive_halving"}, **changes}
    with pytest.raises(SpecError, match=needle) as info:
        StudySpec.from_dict(data)
    assert "\n" not in str(info.value)


def test_early_stopping_off_keeps_old_spec_hashes():
    off = StudySpec.from_dict({"early_stopping": {"pruner": "none"}})
    assert off.spec_hash() == StudySpec().spec_hash()
    assert StudySpec.from_dict({"early_stopping": {"pruner": "median"}}).spec_hash() != StudySpec().spec_hash()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from sparsealloc.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_study_cli_with_early_stopping(tiny_llama_dir, text_file, tmp_path):
    store = f"sqlite:///{tmp_path / 'cli.db'}"
    data = ["--model", str(tiny_llama_dir), "--calib-text", str(text_file), "--calib-samples", "6",
            "--calib-seq-len", "16", "--storage", store, "--no-validate", "--quiet"]
    code, out, err = _cli(["study", "run", "--name", "es", "--trials", "3", "--early-stopping", "successive_halving",
                           *data])
    assert code == 0, err
    study = optuna.load_study(study_name="es", storage=store)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(sorted(t.intermediate_values) == [1, 2] for t in complete)  # 2 batches of 4 windows
    code, out, err = _cli(["study", "run", "--name", "es-rung", "--trials", "3", "--early-stopping",
                           "successive_halving", "--gram-rung", *data])
    assert code == 0, err
    complete = optuna.load_study(study_name="es-rung", storage=store).get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3 and all(sorted(t.intermediate_values) == [1, 2, 3] for t in complete)  # + rung
    code, out, err = _cli(["study", "run", "--name", "bad", "--early-stopping", "medain", *data])
    assert code == 2 and err.count("\n") == 1 and "early_stopping.pruner must be one of" in err


def test_gram_rung_is_opt_in():
    """Successive halving alone stops on calibration batches; the Gram rung only when asked for."""
    assert not StudySpec.from_dict({"early_stopping": {"pruner": "successive_halving"}}).early_stopping.uses_gram_rung
    spec = StudySpec.from_dict({"early_stopping": {"pruner": "successive_halving", "gram_rung": True}})
    assert spec.early_stopping.uses_gram_rung
    assert not StudySpec.from_dict({"early_stopping": {"pruner": "none", "gram_rung": True}}).early_stopping.uses_gram_rung
