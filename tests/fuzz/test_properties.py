"""Property and fuzz tests (hypothesis) over study specs, plans, CLI arguments and store URLs.

Two kinds of property:

* Parsers never fail by accident: for any parsed YAML/JSON, ``StudySpec.from_dict`` and
  ``AllocationPlan.from_dict`` either return a valid object or raise SpecError; any text given to
  the plan or spec loader, any string given as a store URL, ends in SpecError/StorageError or a
  valid value, never in another exception.
* Malformed by construction (one field, flag or URL part made invalid): the command exits with
  code 2 and one ``error:`` line, prints no traceback, writes no store and changes none, and loads
  no model (see ``catalogue.run_case``).

Example counts are modest so the folder runs in well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparsealloc.core.errors import SpecError, StorageError
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.spaces.spec import StudySpec
from sparsealloc.storage.rdb import parse_storage_url, probe_storage


def _load_catalogue():
    name = "sparsealloc_tests_fuzz_catalogue"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("catalogue.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


catalogue = _load_catalogue()

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
CLI = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

SPEC_KEYS = ("name", "model", "target_sparsity", "pattern", "space", "layerwise", "metric", "kv", "allocator",
             "objectives", "sampler", "population_size", "trials", "timeout", "seed", "calibration",
             "validation", "warm_start", "device", "granularity", "bins", "radius", "step", "max_sparsity",
             "params", "exponent_range", "bits", "group_size", "separate_kv", "text", "dataset", "samples",
             "seq_len", "batch_size", "top_k", "windows", "windows_file", "bogus")
NAMES = ("kl", "tpe", "nsga3", "layerwise", "kv", "metric", "wanda", "owl", "uniform", "2:4", "block", "")
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(), st.text(max_size=6),
                    st.sampled_from(NAMES))
json_like = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(SPEC_KEYS), st.integers()), inner,
                                                 max_size=4)), max_leaves=12)
spec_like = st.dictionaries(st.sampled_from(SPEC_KEYS), json_like, max_size=6)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama_dir, text_file):
    return catalogue.make_env(tmp_path_factory.mktemp("fuzz"), tiny_llama_dir, text_file)


# --------------------------------------------------------------------------- specs
@FAST
@given(spec_like)
def test_any_parsed_spec_is_valid_or_a_spec_error(data):
    try:
        spec = StudySpec.from_dict(data)
    except SpecError as exc:
        assert "but" in str(exc) or "expected" in str(exc), str(exc)  # says what was expected and received
        return
    again = StudySpec.from_dict(spec.to_dict())  # what is accepted round-trips
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(spec.to_dict(), sort_keys=True)


@FAST
@given(st.text(max_size=200))
def test_any_spec_text_is_valid_or_a_spec_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        StudySpec.load(path)
    except SpecError:
        pass


VALID_SPEC = {"model": "<model>", "calibration": {"text": "<text>", "samples": 4, "seq_len": 16}, "trials": 2}
bad_field = st.one_of(
    st.tuples(st.just("target_sparsity"), st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9),
                                                    st.text(max_size=4), st.booleans())),
    st.tuples(st.just("trials"), st.one_of(st.integers(max_value=0), st.floats(allow_nan=False).filter(
        lambda v: v != int(v) if math.isfinite(v) else True), st.text(max_size=3))),
    st.tuples(st.just("sampler"), st.text(max_size=8).filter(lambda s: s not in ("tpe", "nsga3", "optuna-nsga3",
                                                                                "random"))),
    st.tuples(st.just("space"), st.lists(st.text(max_size=6), min_size=1, max_size=3).filter(
        lambda v: any(x not in ("layerwise", "metric", "kv", "allocator", "layer_drop") for x in v))),
    st.tuples(st.just("objectives"), st.lists(st.sampled_from(("kv_bytes", "remaining_weights", "latency")),
                                              min_size=1, max_size=2)),
    st.tuples(st.just("seed"), st.one_of(st.text(max_size=3), st.booleans(), st.floats())),
    st.tuples(st.just("name"), st.one_of(st.text(min_size=201, max_size=230), st.just(""),
                                         st.text(max_size=5).map(lambda s: f" {s}"),
                                         st.text(max_size=5).map(lambda s: f"a\n{s}"))),
    st.tuples(st.just("kv"), st.fixed_dictionaries({"bits": st.lists(st.integers(-2, 40).filter(
        lambda b: b not in (2, 3, 4, 8, 16)), min_size=1, max_size=3)})),
    st.tuples(st.just("layerwise"), st.fixed_dictionaries({"radius": st.one_of(st.floats(min_value=1.0),
                                                                                st.floats(max_value=0.0))})),
    st.tuples(st.just("unknown_" + "key"), st.integers()),
)


@CLI
@given(bad_field, st.sampled_from(("yaml", "json")))
def test_a_spec_with_one_bad_field_is_one_clean_error(env, tmp_path_factory, field_value, fmt):
    key, value = field_value
    body = {**VALID_SPEC, key: value}
    text = json.dumps(body) if fmt == "json" else yaml.safe_dump(body, allow_unicode=True)
    case = catalogue.Case(f"fuzz-spec-{key}", "spec",
                          ("--quiet", "study", "run", f"<file:spec.{fmt}>", "--storage", "<fresh>", "--no-validate"),
                          files=((f"spec.{fmt}", text),))
    result = catalogue.run_case(case, env, tmp_path_factory.mktemp("case"))
    assert result.clean, (key, value, result.problems, result.stderr)


# --------------------------------------------------------------------------- plans
plan_like = st.dictionaries(
    st.sampled_from(("schema_version", "model", "metric", "pattern", "sparsity", "kv_bits", "dropped_layers",
                     "provenance", "extra")), json_like, max_size=6).map(lambda d: {"schema_version": 1, **d})


@FAST
@given(plan_like)
def test_any_parsed_plan_is_valid_or_a_spec_error(data):
    try:
        plan = AllocationPlan.from_dict(data)
    except SpecError:
        return
    text = plan.to_json()  # what is accepted can be written and read back (JSON turns keys into strings)
    again = AllocationPlan.from_json(text)
    assert again.to_json() == text == json.dumps(json.loads(text), indent=2)  # a fixed point, indented JSON
    assert AllocationPlan.from_json(again.to_json()) == again


@FAST
@given(st.one_of(st.text(max_size=120), st.builds(json.dumps, json_like)))
def test_any_plan_text_is_valid_or_a_spec_error(text):
    try:
        AllocationPlan.from_json(text)
    except SpecError:
        pass


bad_plan = st.one_of(
    st.fixed_dictionaries({"schema_version": st.integers().filter(lambda v: v != 1)}),
    st.fixed_dictionaries({"schema_version": st.just(1), "sparsity": st.dictionaries(
        st.text(min_size=1, max_size=8), st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9),
                                                   st.text(max_size=3), st.booleans()), min_size=1, max_size=3)}),
    st.fixed_dictionaries({"schema_version": st.just(1), "kv_bits": st.dictionaries(
        st.just("model.layers.0.self_attn"), st.fixed_dictionaries({
            "k": st.integers(-4, 40).filter(lambda b: b not in (2, 3, 4, 8, 16)), "v": st.just(4)}), min_size=1)}),
    st.fixed_dictionaries({"schema_version": st.just(1), "metric": st.fixed_dictionaries({
        "name": st.text(max_size=8).filter(lambda s: s not in ("wanda", "magnitude", "ria", "stade"))})}),
    st.fixed_dictionaries({"schema_version": st.just(1), "pattern": st.text(max_size=5).filter(
        lambda s: s != "unstructured")}),
)


@CLI
@given(bad_plan)
def test_a_malformed_plan_is_one_clean_error(env, tmp_path_factory, plan):
    try:
        AllocationPlan.from_dict(plan)
    except SpecError:
        pass
    else:
        assume(False)  # valid by chance (e.g. an empty metric name filtered differently): not malformed
    case = catalogue.plan_case("fuzz-plan", plan)
    result = catalogue.run_case(case, env, tmp_path_factory.mktemp("case"))
    assert result.clean, (plan, result.problems, result.stderr)


# --------------------------------------------------------------------------- CLI argument vectors
FLAG_VALUES = {
    "--target-sparsity": st.one_of(st.floats(min_value=1.0).map(str), st.floats(max_value=-1e-9).map(str),
                                   st.text(alphabet="abcxyz!", min_size=1, max_size=4)),
    "--trials": st.one_of(st.integers(max_value=0).map(str), st.text(alphabet="abc.", min_size=1, max_size=3)),
    "--calib-samples": st.integers(max_value=0).map(str),
    "--radius": st.one_of(st.floats(min_value=1.0).map(str), st.floats(max_value=0.0).map(str)),
    "--sampler": st.text(alphabet="abcdefg-", min_size=1, max_size=6).filter(
        lambda s: s not in ("tpe", "nsga3", "optuna-nsga3", "random")),
    "--space": st.text(alphabet="abcxyz,", min_size=1, max_size=8),
    "--metric": st.text(alphabet="abcdefgz", min_size=1, max_size=8).filter(lambda s: s not in ("ace",)),
    "--device": st.text(alphabet="abcxyz:9", min_size=1, max_size=6).filter(lambda s: s not in ("cpu", "meta")),
    "--timeout": st.one_of(st.floats(max_value=0.0).map(str), st.just("nan"), st.just("inf")),
    "--workers": st.integers(max_value=-1).map(str),
}


@CLI
@given(st.sampled_from(sorted(FLAG_VALUES)).flatmap(lambda f: st.tuples(st.just(f), FLAG_VALUES[f])))
def test_study_run_with_one_bad_flag_is_one_clean_error(env, tmp_path_factory, flag_value):
    flag, value = flag_value
    case = catalogue.Case(f"fuzz-flag{flag}", "cli", (*catalogue.RUN_FRESH, flag, value))
    result = catalogue.run_case(case, env, tmp_path_factory.mktemp("case"))
    assert result.clean, (flag, value, result.problems, result.stderr)


@CLI
@given(st.sampled_from(("show", "resume", "export", "report")),
       st.text(min_size=1, max_size=40).filter(lambda s: not s.startswith("-")))
def test_any_unknown_study_name_is_one_clean_error(env, tmp_path_factory, action, name):
    assume(name not in ("a", "m", "empty"))
    argv = {"show": ("study", "show", name, "--storage", "<store>"),
            "resume": ("study", "resume", name, "--storage", "<store>"),
            "export": ("export", name, "--storage", "<store>", "--out", "<dir>/x"),
            "report": ("report", name, "--storage", "<store>", "--out", "<dir>/r")}[action]
    # "<" in a name would read as a placeholder: keep the name literal
    case = catalogue.Case("fuzz-name", "cli", tuple(a if a != name else a.replace("<", "\u2039") for a in argv),
                          ("no study named",))
    result = catalogue.run_case(case, env, tmp_path_factory.mktemp("case"))
    assert result.clean, (action, name, result.problems, result.stderr)


@CLI
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-=:./0123456789", max_size=10), max_size=5))
def test_random_words_after_a_command_are_one_clean_error_or_help(env, tmp_path_factory, words):
    """Any words after ``study show``: either a clean error, or (for --help) usage and exit 0."""
    assume(not any(w in ("a", "m", "empty") for w in words))
    assume(not any(w.startswith("--s") for w in words))  # --storage prefix abbreviations pick other stores
    assume(not any(w.startswith("--d") for w in words))  # --debug shows tracebacks on purpose
    argv = ("study", "show", *words, "--storage", "<store>")
    if any(w in ("-h", "--help", "--h", "--he", "--hel") for w in words):
        code, out, err, raised = catalogue.run_main([catalogue.substitute(a, env, Path(".")) for a in argv])
        assert code == 0 and raised is None and "usage" in out
        return
    case = catalogue.Case("fuzz-words", "cli", argv)
    result = catalogue.run_case(case, env, tmp_path_factory.mktemp("case"))
    assert result.clean, (words, result.problems, result.stderr)


# --------------------------------------------------------------------------- store URLs
@FAST
@given(st.text(max_size=60))
def test_any_string_is_a_storage_url_or_a_spec_error(text):
    try:
        url = parse_storage_url(text)
    except SpecError as exc:
        assert "hunter2" not in str(exc)
        return
    assert "://" in url


bad_url = st.one_of(
    st.builds("{}://{}/{}".format, st.sampled_from(("http", "ftp", "redis", "postgres", "sqlite3", "oracle")),
              st.text(alphabet="abc.-", min_size=1, max_size=8), st.text(alphabet="abc", max_size=5)),
    st.builds("postgresql+psycopg2://u:hunter2@127.0.0.1:{}/db".format,
              st.one_of(st.just(catalogue.CLOSED_PORT), st.integers(65536, 10 ** 7), st.text(
                  alphabet="abcxyz", min_size=1, max_size=5))),
    st.builds("sqlite:///<dir>/{}/{}.db".format, st.text(alphabet="abcdefgh_", min_size=1, max_size=8),
              st.text(alphabet="abc", min_size=1, max_size=4)),
    st.sampled_from(("sqlite://", "sqlite:///:memory:", "sqlite:///<text>", "sqlite:///<dir>", "", " ",
                     "sqlite:////proc/s.db")),
    st.text(alphabet="abcdefgh./_", min_size=1, max_size=12).filter(
        lambda s: not s.endswith((".db", ".sqlite", ".sqlite3"))),
)


@FAST
@given(bad_url)
def test_a_bad_url_never_escapes_as_another_exception(env, tmp_path_factory, url):
    url = catalogue.substitute(url, env, tmp_path_factory.mktemp("url"))
    with pytest.raises((SpecError, StorageError)) as info:
        probe_storage(url, timeout=2) if "://" in url else parse_storage_url(url)
    assert "hunter2" not in str(info.value)


@CLI
@given(bad_url, st.sampled_from(("run", "list")))
def test_a_bad_url_is_one_clean_error(env, tmp_path_factory, url, command):
    case = catalogue.storage_case("fuzz-url", url, command=command)
    result = catalogue.run_case(case, env, tmp_path_factory.mktemp("case"))
    assert result.clean, (url, command, result.problems, result.stderr)
