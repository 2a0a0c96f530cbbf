"""Checks of ``search.study.run`` that need no model: they fail before anything is loaded."""

from __future__ import annotations

import contextlib

import pytest

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.search import study as study_api
from sparsealloc.spaces.spec import CalibrationSpec, StudySpec


def test_a_name_taken_by_another_spec_fails_before_the_model_loads(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = StudySpec(name="taken", model=str(tiny_llama_dir), target_sparsity=0.5, trials=1, warm_start=("uniform",),
                     calibration=CalibrationSpec(text=str(text_file), samples=4, seq_len=16))
    study_api.run(spec, url, validate=False)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(study_api, "build_evaluator", no_load)
    with pytest.raises(SpecError, match="exists with a different spec.*target_sparsity"):
        study_api.run(spec.override(target_sparsity=0.6), url, validate=False)
    with pytest.raises(AssertionError, match="the model was loaded"):  # the same spec goes on to load it
        study_api.run(spec.override(trials=2), url, validate=False)


def test_validation_stops_at_its_time_bound_and_says_what_it_left(monkeypatch):
    from types import SimpleNamespace

    from sparsealloc.search import session
    from sparsealloc.search.study import validation_lines

    clock = [0.0]
    monkeypatch.setattr(session, "_clock", lambda: clock[0])
    trials = [SimpleNamespace(number=n, values=(0.1 * n,), user_attrs={"plan": {}}, params={"x": n})
              for n in range(5)]
    monkeypatch.setattr(session, "trials_to_validate", lambda study, k: trials)
    monkeypatch.setattr(session, "validation_source",
                        lambda spec: SimpleNamespace(read=lambda: "text", describe=lambda: "file:text"))
    monkeypatch.setattr(session, "tokenize_stream", lambda tok, text: None)
    monkeypatch.setattr(AllocationPlan, "from_dict", staticmethod(lambda d: None))

    def perplexity(*args):
        clock[0] += 40.0  # each plan takes 40 s
        return 10.0 + clock[0] / 1000

    monkeypatch.setattr(session, "perplexity", perplexity)
    evaluator = SimpleNamespace(ctx=SimpleNamespace(tokenizer=None, model=None, restore_=lambda: None),
                                applied=lambda plan: contextlib.nullcontext())
    stored = {}
    study = SimpleNamespace(set_user_attr=lambda k, v: stored.update({k: v}), directions=[1],
                            best_trial=trials[0])
    spec = StudySpec()
    result = session.validate(study, evaluator, spec, budget_seconds=100.0)
    assert sorted(result.ppl) == [0, 1] and result.skipped == (2, 3, 4)  # a third plan would end at 120 s
    result = session.validate(study, evaluator, spec, budget_seconds=1.0)
    assert sorted(result.ppl) == [0]  # the best one always
    result = session.validate(study, evaluator, spec)
    assert sorted(result.ppl) == [0, 1, 2, 3, 4] and result.skipped == ()
    monkeypatch.setattr("sparsealloc.search.study.warm_start_trials", lambda study: {})
    lines = validation_lines(study, session.validate(study, evaluator, spec, budget_seconds=100.0).to_dict())
    assert "3 more plan(s) not validated" in lines[-1]


def test_validation_takes_the_evo_parents_first_newest_first():
    """Under a time bound only the first candidates are validated: for evo these must be its latest
    parents, not the trials whose values (on other generations' windows) happen to be lowest."""
    import optuna

    from sparsealloc.core.keys import PLAN, WARM_START
    from sparsealloc.search.samplers.evo import PARENT_ATTR
    from sparsealloc.search.session import trials_to_validate

    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 10)}
    values = {0: 0.30, 1: 0.10, 2: 0.20, 3: 0.50, 4: 0.40}  # the stale warm start (1) scored lowest
    for n, value in values.items():
        attrs = {PLAN: {}, **({WARM_START: "uniform"} if n == 1 else {})}
        study.add_trial(optuna.trial.create_trial(params={"x": float(n)}, distributions=dist, value=value,
                                                  user_attrs=attrs))
    study.set_user_attr(PARENT_ATTR, {"history": [1, 2, 4, 3]})
    order = [t.number for t in trials_to_validate(study, top_k=2)]
    assert order[:2] == [3, 4]  # newest parents first
    assert order == [3, 4, 1, 2]  # then the lowest values, the warm start already in

    plain = optuna.create_study()
    for n, value in values.items():
        plain.add_trial(optuna.trial.create_trial(params={"x": float(n)}, distributions=dist, value=value,
                                                  user_attrs={PLAN: {}}))
    assert [t.number for t in trials_to_validate(plain, top_k=2)] == [1, 2]  # other samplers: best proxy first


def test_validation_takes_the_best_warm_start_first():
    """A seed plan that continues an earlier search scores below the uniform start: a time-bounded
    validation must reach it first (the warm starts come in proxy order, not creation order)."""
    import optuna

    from sparsealloc.core.keys import PLAN, WARM_START
    from sparsealloc.search.session import trials_to_validate

    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 10)}
    starts = {0: ("uniform", 0.16), 1: ("owl", 0.17), 2: ("depth_ramp", 0.155), 3: ("plan:earlier", 0.146)}
    for n, (name, value) in starts.items():
        study.add_trial(optuna.trial.create_trial(params={"x": float(n)}, distributions=dist, value=value,
                                                  user_attrs={PLAN: {}, WARM_START: name}))
    for n in (4, 5, 6):
        study.add_trial(optuna.trial.create_trial(params={"x": float(n)}, distributions=dist, value=0.13 + n / 1000,
                                                  user_attrs={PLAN: {}}))
    order = [t.number for t in trials_to_validate(study, top_k=2)]
    assert order == [4, 5, 3, 2, 0, 1]


def test_validation_over_several_texts_ranks_plans_by_the_geometric_mean(monkeypatch, tmp_path):
    """``validation.extra_texts``: each plan is scored on every text, and its validation PPL (what
    ``export`` picks by) is the geometric mean, so a plan better on the second text by a larger factor
    than it is worse on the first wins, although the first text alone would pick the other."""
    from types import SimpleNamespace

    from sparsealloc.search import session
    from sparsealloc.search.study import validation_lines

    first, second = tmp_path / "prose.txt", tmp_path / "code.txt"
    first.write_text("prose")
    second.write_text("code")
    trials = [SimpleNamespace(number=n, values=(0.1 * n,), user_attrs={"plan": {"n": n}}, params={"x": n})
              for n in range(2)]
    monkeypatch.setattr(session, "trials_to_validate", lambda study, k: trials)
    monkeypatch.setattr(session, "tokenize_stream", lambda tok, text: text)
    monkeypatch.setattr(AllocationPlan, "from_dict", staticmethod(lambda d: d["n"]))
    applied = []
    # trial 0: 100 on prose, 50 on code (mean 70.7); trial 1: 110 on prose, 40 on code (mean 66.3)
    table = {(0, "prose"): 100.0, (0, "code"): 50.0, (1, "prose"): 110.0, (1, "code"): 40.0}
    monkeypatch.setattr(session, "perplexity", lambda model, stream, *a: table[(applied[-1], stream)])

    @contextlib.contextmanager
    def apply(plan):
        applied.append(plan)
        yield

    evaluator = SimpleNamespace(ctx=SimpleNamespace(tokenizer=None, model=None, restore_=lambda: None), applied=apply)
    stored = {}
    study = SimpleNamespace(set_user_attr=lambda k, v: stored.update({k: v}), directions=[1], best_trial=trials[0])
    spec = StudySpec.from_dict({"validation": {"text": str(first), "extra_texts": [str(second)]}})
    result = session.validate(study, evaluator, spec)
    assert result.ppl[0] == pytest.approx((100.0 * 50.0) ** 0.5) and result.ppl[1] == pytest.approx((110.0 * 40.0) ** 0.5)
    assert min(result.ppl, key=result.ppl.get) == 1
    assert min(result.by_text[f"file:{first}"], key=result.by_text[f"file:{first}"].get) == 0  # prose alone: trial 0
    data = stored["validation"]
    assert data["by_text"] == {f"file:{first}": {"0": 100.0, "1": 110.0}, f"file:{second}": {"0": 50.0, "1": 40.0}}
    monkeypatch.setattr("sparsealloc.search.study.warm_start_trials", lambda study: {})
    lines = validation_lines(study, data)
    assert "geometric mean over 2 texts" in lines[0] and lines[2] == f"  text 2: file:{second}"
    assert "text 1 110.000  text 2 40.000" in lines[3]  # best first


def test_extra_validation_texts_must_be_file_paths():
    with pytest.raises(SpecError, match="validation.extra_texts must be a list of text file paths"):
        StudySpec.from_dict({"validation": {"extra_texts": ["a.txt", ""]}})
    with pytest.raises(SpecError, match="validation.extra_texts"):
        StudySpec.from_dict({"validation": {"extra_texts": "a.txt"}})
