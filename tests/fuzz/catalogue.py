"""The catalogue of malformed inputs and the runner that checks each one ends cleanly.

Shared by ``tests/fuzz/test_catalogue.py`` (one parametrized test per case) and
``benchmarks/malformed_inputs.py`` (counts per category); both load this file by path.

A case is an argument vector for ``sparsealloc`` with placeholders, optional files to write first,
and fragments its one error line must contain. "Clean" means: exit code 2, exactly one non-empty
line on stderr starting with ``error:``, no traceback anywhere, the existing store unchanged, no
new store created, and no model loaded unless the case needs the (tiny) model.

Placeholders: ``<model>`` tiny model folder, ``<text>`` corpus file, ``<store>`` URL of a store
holding study "a", ``<fresh>`` URL of a store that must not come into existence, ``<dir>`` the
case's work folder, ``<file:NAME>`` a file the case writes (``files``).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

DATA = ("--model", "<model>", "--calib-text", "<text>", "--calib-samples", "4", "--calib-seq-len", "16",
        "--no-validate", "--trials", "2")
RUN_FRESH = ("--quiet", "study", "run", "--name", "x", "--storage", "<fresh>", *DATA)
SPEC_BASE = "model: <model>\ncalibration: {text: <text>, samples: 4, seq_len: 16}\ntrials: 2\n"
CLOSED_PORT = 1  # nothing listens on TCP port 1 of 127.0.0.1: connections are refused at once


@dataclass(frozen=True)
class Case:
    """One malformed input.

    Attributes:
        id: Unique name.
        category: "spec", "plan", "cli" or "storage".
        argv: Arguments for ``sparsealloc`` (placeholders allowed).
        fragments: Texts the error line must contain.
        files: (name, content) written into the work folder first; bytes are written as is.
        prepare: Name of a function in :data:`PREPARE` that builds a file (e.g. an old-schema store).
        needs_model: The error can only be found with the (tiny) model loaded.
    """

    id: str
    category: str
    argv: tuple[str, ...]
    fragments: tuple[str, ...] = ()
    files: tuple[tuple[str, str | bytes], ...] = ()
    prepare: str | None = None
    needs_model: bool = False


def spec_case(case_id: str, body: str, *fragments: str, base: bool = True, name: str = "spec.yaml",
              validate: bool = False) -> Case:
    """``study run SPEC`` with a spec file of ``body`` (after the tiny-model base, unless ``base=False``)."""
    text = (SPEC_BASE if base else "") + body
    argv = ("--quiet", "study", "run", f"<file:{name}>", "--storage", "<fresh>", *(() if validate else ("--no-validate",)))
    return Case(case_id, "spec", argv, fragments, files=((name, text),))


def plan_case(case_id: str, plan: Any, *fragments: str, raw: bool = False, command: str = "apply",
              needs_model: bool = False, extra: Sequence[str] = ()) -> Case:
    """``apply --plan FILE`` (or ``prune --plan FILE``) with ``plan`` (JSON-encoded unless ``raw``)."""
    text = plan if raw else json.dumps(plan)
    if command == "apply":
        argv = ("--quiet", "apply", "--plan", "<file:plan.json>", "--model", "<model>", "--calib-text", "<text>",
                "--calib-samples", "4", "--calib-seq-len", "16", "--save", "<dir>/out")
    else:
        argv = ("--quiet", "prune", "--plan", "<file:plan.json>", "--model", "<model>", "--calib-text", "<text>",
                "--calib-samples", "4", "--calib-seq-len", "16", "--no-eval")
    return Case(case_id, "plan", argv + tuple(extra), fragments, files=(("plan.json", text),),
                needs_model=needs_model)


def cli_case(case_id: str, argv: Sequence[str], *fragments: str, files=(), needs_model: bool = False) -> Case:
    return Case(case_id, "cli", tuple(argv), fragments, files=tuple(files), needs_model=needs_model)


def storage_case(case_id: str, url: str, *fragments: str, command: str = "run", files=(),
                 prepare: str | None = None) -> Case:
    """The store URL ``url`` given to ``study run`` (a writing command) or ``study list`` (a reading one)."""
    if command == "run":
        argv = ("--quiet", "study", "run", "--name", "x", "--storage", url, *DATA)
    else:
        argv = ("--quiet", "study", "list", "--storage", url)
    return Case(case_id, "storage", argv, fragments, files=tuple(files), prepare=prepare)


def _plan(**fields: Any) -> dict[str, Any]:
    return {"schema_version": 1, "sparsity": {"*": 0.5}, **fields}


CASES: tuple[Case, ...] = (
    # ------------------------------------------------------------------ study specs (YAML / JSON files)
    spec_case("spec-unknown-key", "target_sparsty: 0.5\n", "spec accepts keys", "target_sparsty"),
    spec_case("spec-unknown-section-key", "layerwise: {granularty: block}\n", "'layerwise' accepts keys",
              "granularty"),
    spec_case("spec-non-string-key", "1: 2\n", "spec accepts keys", "'1'"),
    spec_case("spec-not-a-mapping", "- a\n- b\n", "must be a mapping", "list", base=False),
    spec_case("spec-broken-yaml", "name: [unclosed\n  : : {\n", "YAML or JSON", "parsing failed", base=False),
    spec_case("spec-broken-json", '{"name": "x", "trials": ', "parsing failed", base=False, name="spec.json"),
    spec_case("spec-nested-too-deeply", "[" * 5000, "nested too deeply", base=False),
    Case("spec-not-utf8", "spec", ("--quiet", "study", "run", "<file:spec.yaml>", "--storage", "<fresh>"),
         ("readable spec file", "utf-8"), files=(("spec.yaml", b"name: \xff\xfe\x00x\n"),)),
    Case("spec-missing-file", "spec", ("--quiet", "study", "run", "<dir>/missing.yaml", "--storage", "<fresh>"),
         ("readable spec file", "missing.yaml")),
    spec_case("spec-sparsity-text", "target_sparsity: half\n", "target_sparsity must be in [0, 1)", "'half'"),
    spec_case("spec-sparsity-too-high", "target_sparsity: 1.5\n", "target_sparsity must be in [0, 1)", "1.5"),
    spec_case("spec-sparsity-bool", "target_sparsity: true\n", "target_sparsity", "True"),
    spec_case("spec-unknown-space", "space: [layerwise, magic]\n", "space must be distinct names", "magic"),
    spec_case("spec-space-not-a-list", "space: 5\n", "space must be a list", "5"),
    spec_case("spec-space-both-kinds", "space: [layerwise, allocator]\n", "either layerwise or allocator"),
    spec_case("spec-unknown-objective", "objectives: [kl, latency]\n", "objectives must be distinct", "latency"),
    spec_case("spec-first-objective-not-proxy", "objectives: [kv_bytes]\n", "error proxy", "kv_bytes"),
    spec_case("spec-unknown-sampler", "sampler: hyperband\n", "sampler must be one of", "hyperband"),
    spec_case("spec-trials-zero", "trials: 0\n", "trials must be a positive integer", "0"),
    spec_case("spec-trials-fraction", "trials: 2.5\n", "trials must be a positive integer", "2.5"),
    spec_case("spec-timeout-negative", "timeout: -3\n", "timeout must be null or a positive", "-3"),
    spec_case("spec-seed-text", "seed: abc\n", "seed must be an integer", "'abc'"),
    spec_case("spec-granularity", "layerwise: {granularity: row}\n", "layerwise.granularity", "'row'"),
    spec_case("spec-radius", "layerwise: {radius: 1.5}\n", "layerwise.radius must be in (0, 1)", "1.5"),
    spec_case("spec-max-below-target", "target_sparsity: 0.9\nlayerwise: {max_sparsity: 0.8}\n",
              "below layerwise.max_sparsity", "0.9"),
    spec_case("spec-kv-bits", "kv: {bits: [1, 5]}\n", "kv.bits must be a non-empty subset", "(1, 5)"),
    spec_case("spec-kv-bits-scalar", "kv: {bits: 4}\n", "kv.bits must be a list", "4"),
    spec_case("spec-kv-group-size", "kv: {group_size: 0}\n", "kv.group_size must be a positive integer", "0"),
    spec_case("spec-exponent-range-text", "metric: {exponent_range: [0, high]}\n", "metric.exponent_range",
              "'high'"),
    spec_case("spec-unknown-allocator", "space: [allocator]\nallocator: {name: magic}\n", "allocator.name",
              "'magic'"),
    spec_case("spec-unknown-warm-start", "warm_start: [uniform, sunshine]\n", "warm_start must be names",
              "sunshine"),
    spec_case("spec-bad-pattern", "pattern: '3:2'\n", "pattern must be 'unstructured' or 'N:M'", "'3:2'"),
    spec_case("spec-calibration-samples", "calibration: {text: <text>, samples: -4}\n",
              "calibration.samples must be a positive integer", "-4", base=False),
    spec_case("spec-calibration-two-sources", "calibration: {text: <text>, dataset: wikitext}\n",
              "calibration takes one of text, dataset, windows_file or domains", base=False),
    spec_case("spec-calibration-seed-text", "calibration: {text: <text>, seed: abc}\n",
              "calibration.seed must be an integer", "'abc'", base=False),
    spec_case("spec-name-control-character", 'name: "line\\nbreak"\n', "printable characters", "'line\\nbreak'"),
    spec_case("spec-name-too-long", f"name: {'n' * 300}\n", "at most 200", "(300 characters)"),
    spec_case("spec-unknown-metric", "metric: {name: wandda}\n", "unknown pruning metric 'wandda'", "wanda"),
    spec_case("spec-metric-param-type", "metric: {name: stade, params: {bias: maybe}}\n",
              "parameter 'bias' of pruning metric 'stade' expects true or false", "'maybe'"),
    spec_case("spec-metric-unknown-param", "metric: {name: wanda, params: {alpha: 2}}\n",
              "bad parameters", "alpha"),
    spec_case("spec-model-missing", "model: /nonexistent/model\ncalibration: {text: <text>}\n",
              "expected a model directory", "/nonexistent/model", base=False),
    spec_case("spec-device", "device: quantum\n", "expected a torch device", "'quantum'"),
    spec_case("spec-validation-top-k", "validation: {top_k: -1}\n", "validation.top_k", "-1"),
    spec_case("spec-validation-text-missing", "validation: {text: /nonexistent/held-out.txt}\n",
              "readable text file", "held-out.txt", validate=True),
    # ------------------------------------------------------------------ allocation plans (JSON files)
    plan_case("plan-not-json", "{not json", "valid JSON", raw=True),
    plan_case("plan-a-list", [], "a plan must be a JSON object", "list"),
    plan_case("plan-schema-2", _plan(schema_version=2), "schema_version must be 1", "2"),
    plan_case("plan-no-schema", {"sparsity": {"*": 0.5}}, "schema_version must be 1", "None"),
    plan_case("plan-schema-bool", _plan(schema_version=True), "schema_version must be 1", "True"),
    plan_case("plan-unknown-key", _plan(bogus=1), "unknown keys", "bogus"),
    plan_case("plan-ratio-one", _plan(sparsity={"*": 1.0}), "must be in [0, 1)", "1.0"),
    plan_case("plan-ratio-negative", _plan(sparsity={"model.layers.0": -0.1}), "must be in [0, 1)", "-0.1"),
    plan_case("plan-ratio-text", _plan(sparsity={"*": "half"}), "must be a number in [0, 1)", "'half'"),
    plan_case("plan-ratio-nan", '{"schema_version": 1, "sparsity": {"*": NaN}}', "must be in [0, 1)", "nan",
              raw=True),
    plan_case("plan-empty-module-name", _plan(sparsity={"": 0.5}), "keys must be module names", "''"),
    plan_case("plan-sparsity-not-object", _plan(sparsity=[0.5]), "'sparsity' must be an object", "[0.5]"),
    plan_case("plan-kv-bits-5", _plan(kv_bits={"model.layers.0.self_attn": {"k": 5, "v": 4}}),
              "must be one of [2, 3, 4, 8, 16]", "5"),
    plan_case("plan-kv-bits-missing-v", _plan(kv_bits={"model.layers.0.self_attn": {"k": 4}}),
              "kv_bits of 'model.layers.0.self_attn'", "{'k': 4}"),
    plan_case("plan-bad-pattern", _plan(pattern="2:2"), "pattern must be 'unstructured' or 'N:M'", "'2:2'"),
    plan_case("plan-nm-ratio-mismatch", _plan(pattern="2:4", sparsity={"*": 0.7}), "with pattern 2:4", "0.7"),
    plan_case("plan-unknown-metric", _plan(metric={"name": "wandda"}), "unknown pruning metric", "wandda"),
    plan_case("plan-metric-bad-param", _plan(metric={"name": "ria", "params": {"alpha": 1}}), "bad parameters",
              "alpha"),
    plan_case("plan-metric-param-type", _plan(metric={"name": "ria", "params": {"a": "big"}}),
              "expects a finite number", "'big'"),
    plan_case("plan-dropped-not-a-list", _plan(dropped_layers="model.layers.0"), "'dropped_layers' must be a list"),
    plan_case("plan-nested-too-deeply", "[" * 50000, "nested too deeply", raw=True),
    plan_case("plan-unknown-module", _plan(sparsity={"model.layers.9": 0.5}), "model.layers.9",
              "not a prunable Linear module", needs_model=True),
    plan_case("plan-unknown-kv-module", _plan(kv_bits={"nosuch": {"k": 4, "v": 4}}), "not an attention module",
              "'nosuch'", needs_model=True),
    plan_case("plan-drops-every-block", _plan(dropped_layers=[f"model.layers.{i}" for i in range(4)]),
              "drops all 4 decoder blocks", needs_model=True),
    plan_case("plan-prune-with-flags", _plan(), "expected either --plan or --sparsity", command="prune",
              extra=("--sparsity", "0.5")),
    Case("plan-missing-file", "plan", ("--quiet", "apply", "--plan", "<dir>/missing.json", "--model", "<model>",
                                       "--save", "<dir>/out"), ("readable plan JSON file", "missing.json")),
    # ------------------------------------------------------------------ command-line arguments
    cli_case("cli-unknown-command", ["frobnicate"], "invalid choice", "frobnicate"),
    cli_case("cli-no-command", [], "required"),
    cli_case("cli-unknown-study-action", ["study", "frob"], "invalid choice", "frob"),
    cli_case("cli-unknown-flag", ["prune", "--sparsty", "0.5"], "unrecognized arguments", "--sparsty"),
    cli_case("cli-log-format", ["--log-format", "xml", "study", "list"], "--log-format", "'xml'"),
    cli_case("cli-sparsity-high", ["prune", "--sparsity", "1.5"], "[0, 1)", "1.5"),
    cli_case("cli-sparsity-text", ["prune", "--sparsity", "abc"], "[0, 1)", "'abc'"),
    cli_case("cli-sparsity-nan", ["prune", "--sparsity", "nan"], "[0, 1)", "nan"),
    cli_case("cli-calib-samples-zero", ["prune", "--calib-samples", "0"], "positive integer", "0"),
    cli_case("cli-seed-text", ["prune", "--seed", "x"], "--seed", "'x'"),
    cli_case("cli-metric-arg-no-value", ["prune", "--metric-arg", "novalue"], "KEY=VALUE", "novalue"),
    cli_case("cli-pattern", ["prune", "--pattern", "4:2"], "0 < N < M", "'4:2'"),
    cli_case("cli-unknown-metric", ["prune", "--metric", "wandda"], "unknown pruning metric", "wandda"),
    cli_case("cli-metric-param-type", ["prune", "--metric", "stade", "--metric-arg", "bias=maybe"],
             "expects true or false", "'maybe'"),
    cli_case("cli-unknown-allocator", ["prune", "--allocator", "owll"], "unknown allocator", "owll"),
    cli_case("cli-allocator-arg-alone", ["prune", "--allocator-arg", "m=1"], "--allocator NAME", "no --allocator"),
    cli_case("cli-allocator-arg-type", ["prune", "--allocator", "owl", "--allocator-arg", "m=lots"],
             "parameter 'm' of allocator 'owl'", "'lots'"),
    cli_case("cli-two-calibration-sources", ["prune", "--calib-text", "<text>", "--calib-dataset", "x"],
             "not allowed with", "--calib-text"),
    cli_case("cli-calib-text-missing", ["--quiet", "prune", "--model", "<model>", "--calib-text",
                                        "<dir>/nowhere.txt"], "readable text file", "nowhere.txt"),
    cli_case("cli-calib-text-empty", ["--quiet", "prune", "--model", "<model>", "--calib-text", "<file:empty.txt>"],
             "non-empty text file", "empty.txt", files=[("empty.txt", "  \n")]),
    cli_case("cli-model-missing", ["--quiet", "prune", "--model", "/nonexistent/model", "--calib-text", "<text>"],
             "/nonexistent/model"),
    cli_case("cli-model-is-a-file", ["--quiet", "prune", "--model", "<text>", "--calib-text", "<text>"],
             "model directory with config.json"),
    cli_case("cli-model-not-gguf", ["--quiet", "prune", "--model", "<file:fake.gguf>", "--calib-text", "<text>"],
             "GGUF", files=[("fake.gguf", "not a gguf file")]),
    cli_case("cli-device-name", ["--quiet", "prune", "--model", "<model>", "--calib-text", "<text>", "--device",
                                 "banana"], "torch device", "'banana'"),
    cli_case("cli-device-absent-gpu", ["--quiet", "prune", "--model", "<model>", "--calib-text", "<text>",
                                       "--device", "cuda:7"], "CUDA device", "'cuda:7'"),
    cli_case("cli-save-is-a-file", ["--quiet", "prune", "--model", "<model>", "--calib-text", "<text>", "--save",
                                    "<text>"], "--save to name a folder", "is a file"),
    cli_case("cli-evaluate-stride", ["evaluate", "--stride", "0"], "positive integer", "0"),
    cli_case("cli-evaluate-text-too-short", ["--quiet", "evaluate", "--model", "<model>", "--text",
                                             "<file:short.txt>", "--seq-len", "16"], "need at least seq_len=16",
             files=[("short.txt", "the dog")], needs_model=True),
    cli_case("cli-run-workers", [*RUN_FRESH, "--workers", "-1"], "--workers >= 0", "-1"),
    cli_case("cli-run-radius", [*RUN_FRESH, "--radius", "0"], "layerwise.radius", "0.0"),
    cli_case("cli-run-timeout", [*RUN_FRESH, "--timeout", "-1"], "timeout", "-1.0"),
    cli_case("cli-run-timeout-nan", [*RUN_FRESH, "--timeout", "nan"], "timeout", "nan"),
    cli_case("cli-run-objectives-twice", [*RUN_FRESH, "--objectives", "kl,kl"], "distinct", "('kl', 'kl')"),
    cli_case("cli-run-empty-space", [*RUN_FRESH, "--space", ""], "space must be distinct names", "()"),
    cli_case("cli-run-empty-name", [*RUN_FRESH, "--name", ""], "name must be a non-empty string", "''"),
    cli_case("cli-run-name-spaces", [*RUN_FRESH, "--name", " padded "], "without surrounding spaces"),
    cli_case("cli-run-export-is-a-file", [*RUN_FRESH, "--export", "<text>"], "--export to name a folder"),
    cli_case("cli-run-unknown-metric", [*RUN_FRESH, "--metric", "wandda"], "unknown pruning metric", "wandda"),
    cli_case("cli-run-calib-missing", [*RUN_FRESH, "--calib-text", "<dir>/nowhere.txt"], "readable text file",
             "nowhere.txt"),
    cli_case("cli-run-spec-mismatch", ["--quiet", "study", "run", "--name", "a", "--storage", "<store>", *DATA,
                                       "--sampler", "random", "--target-sparsity", "0.4"], "different spec",
             "target_sparsity: stored 0.5, given 0.4", needs_model=True),
    cli_case("cli-resume-budget", ["study", "resume", "a", "--storage", "<store>", "--trials", "0"],
             "positive integer", "0"),
    cli_case("cli-resume-device", ["--quiet", "study", "resume", "a", "--storage", "<store>", "--device",
                                   "banana"], "torch device", "'banana'"),
    cli_case("cli-resume-unknown-study", ["study", "resume", "nosuch", "--storage", "<store>"],
             "no study named 'nosuch'", "it holds: a"),
    cli_case("cli-show-unknown-study", ["study", "show", "nosuch", "--storage", "<store>"], "no study named"),
    cli_case("cli-export-unknown-study", ["export", "nosuch", "--storage", "<store>", "--out", "<dir>/x"],
             "no study named"),
    cli_case("cli-export-out-is-a-file", ["export", "a", "--storage", "<store>", "--out", "<text>"],
             "--out to name a folder"),
    cli_case("cli-export-no-completed-trial", ["export", "empty", "--storage", "<store>", "--out", "<dir>/x"],
             "no completed trial to export"),
    cli_case("cli-report-unknown-study", ["report", "nosuch", "--storage", "<store>", "--out", "<dir>/r"],
             "no study named"),
    cli_case("cli-report-no-completed-trial", ["report", "empty", "--storage", "<store>", "--out", "<dir>/r"],
             "no completed trial"),
    cli_case("cli-dashboard-port", ["dashboard", "--storage", "<store>", "--port", "0"], "port in 1..65535", "0"),
    # ------------------------------------------------------------------ storage URLs
    storage_case("storage-http", "http://example.org/db", "sqlite, postgresql or mysql", "'http'"),
    storage_case("storage-mongodb", "mongodb://host/db", "sqlite, postgresql or mysql", "'mongodb'"),
    storage_case("storage-no-scheme", "studies.txt", "storage URL", "'studies.txt'"),
    storage_case("storage-empty", "", "storage URL", "''"),
    storage_case("storage-unparsable", "://nothing", "storage URL", "'://nothing'"),
    storage_case("storage-in-memory", "sqlite://", "SQLite file", "in-memory"),
    storage_case("storage-port-text", "postgresql+psycopg2://u:hunter2@127.0.0.1:notaport/db", "storage URL",
                 "notaport"),
    storage_case("storage-port-range", "postgresql+psycopg2://u@127.0.0.1:99999/db", "port in 1..65535", "99999"),
    storage_case("storage-missing-directory", "sqlite:////nonexistent_dir/x.db", "existing directory",
                 "/nonexistent_dir"),
    storage_case("storage-read-only-filesystem", "sqlite:////proc/x.db", "writable directory", "'/proc'"),
    storage_case("storage-a-directory", "sqlite:///<dir>", "SQLite file", "is a directory"),
    storage_case("storage-not-a-database", "sqlite:///<text>", "cannot open the study store",
                 "file is not a database"),
    storage_case("storage-closed-port", f"postgresql+psycopg2://postgres@127.0.0.1:{CLOSED_PORT}/test",
                 "cannot open the study store", "refused"),
    storage_case("storage-driver-missing", f"postgresql+pg8000://postgres@127.0.0.1:{CLOSED_PORT}/test",
                 "driver is not installed", "psycopg2"),
    storage_case("storage-mysql-driver-missing", f"mysql://root@127.0.0.1:{CLOSED_PORT}/test",
                 "driver is not installed", "pymysql"),
    storage_case("storage-list-missing-file", "sqlite:///<dir>/missing.db", "does not exist", "missing.db",
                 command="list"),
    storage_case("storage-list-not-a-store", "sqlite:///<file:empty.db>", "holds no Optuna tables",
                 command="list", files=[("empty.db", "")]),
    storage_case("storage-old-schema", "sqlite:///<dir>/old.db", "optuna storage upgrade", "v3.0.0.a",
                 prepare="old_schema_store"),
    storage_case("storage-old-schema-list", "sqlite:///<dir>/old.db", "optuna storage upgrade",
                 command="list", prepare="old_schema_store"),
    storage_case("storage-unknown-schema", "sqlite:///<dir>/future.db", "does not know", "pip install -U optuna",
                 prepare="future_schema_store"),
)


# ---------------------------------------------------------------------------------- environment
@dataclass
class Env:
    """Where the cases run: the tiny model, a text file, a store with studies, a scratch folder."""

    root: Path
    model_dir: Path
    text_file: Path
    store_url: str
    fresh_path: Path  # in an existing folder: a command that wrongly went ahead would create it

    @property
    def fresh_url(self) -> str:
        return f"sqlite:///{self.fresh_path}"


def make_env(root: Path, model_dir: Path, text_file: Path) -> Env:
    """Build the store: study "a" (3 completed trials, model ``model_dir``), a 2-objective study "m"
    and a study "empty" with no completed trial; no weights are loaded (layout from the config)."""
    from sparsealloc.core.types import Outcome
    from sparsealloc.pruning.model.models import load_layout
    from sparsealloc.search.session import open_sampler
    from sparsealloc.spaces.space import SearchSpace
    from sparsealloc.spaces.spec import StudySpec
    from sparsealloc.storage.rdb import open_storage

    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'store.db'}"
    storage = open_storage(url)
    layout = load_layout(str(model_dir))
    for name, objectives, n_done in (("a", ("kl",), 3), ("m", ("kl", "kv_bytes"), 2), ("empty", ("kl",), 0)):
        spec = StudySpec.from_dict({
            "name": name, "model": str(model_dir), "target_sparsity": 0.5, "objectives": list(objectives),
            "space": ["layerwise", "kv"] if len(objectives) > 1 else ["layerwise"], "sampler": "random",
            "calibration": {"text": str(text_file), "samples": 4, "seq_len": 16}})
        space = SearchSpace(spec, layout)
        sampler = open_sampler(spec, storage, space)
        for i, proposal in enumerate(sampler.ask(n_done) if n_done else []):
            plan = space.decode(proposal.params).to_plan()
            values = tuple(0.1 * (i + 1) + k for k in range(len(objectives)))
            sampler.tell(proposal.trial_number, Outcome("complete", values, attrs={"plan": plan.to_dict()}))
    storage.engine.dispose()
    return Env(root, Path(model_dir), Path(text_file), url, root / "fresh-never.db")


def old_schema_store(folder: Path, env: Env) -> None:
    """A copy of the store stamped with an older Optuna schema revision."""
    _restamp(folder / "old.db", env, "v3.0.0.a")


def future_schema_store(folder: Path, env: Env) -> None:
    """A copy of the store stamped with a revision this Optuna does not know."""
    _restamp(folder / "future.db", env, "v9.9.9.z")


def _restamp(path: Path, env: Env, revision: str) -> None:
    source = sqlite3.connect(env.store_url.removeprefix("sqlite:///"))
    target = sqlite3.connect(path)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")
        target.execute("UPDATE alembic_version SET version_num = ?", (revision,))
        target.commit()
    finally:
        source.close()
        target.close()


PREPARE: dict[str, Callable[[Path, Env], None]] = {
    "old_schema_store": old_schema_store,
    "future_schema_store": future_schema_store,
}


# ---------------------------------------------------------------------------------- running one case
@dataclass
class Result:
    """What one case did; ``problems`` empty means it ended cleanly."""

    case: Case
    code: int | None
    stderr: str
    problems: list[str] = field(default_factory=list)
    model_loads: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[0] if len(lines) == 1 else ""


def store_snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table of the SQLite store (read-only): any write a command made shows."""
    path = url.removeprefix("sqlite:///")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(con.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in sorted(tables)}
    finally:
        con.close()


def substitute(text: str, env: Env, folder: Path) -> str:
    """Replace the placeholders of ``text``."""
    import re

    text = re.sub(r"<file:([^>]+)>", lambda m: str(folder / m.group(1)), text)
    return (text.replace("<model>", str(env.model_dir)).replace("<text>", str(env.text_file))
            .replace("<store>", env.store_url).replace("<fresh>", env.fresh_url).replace("<dir>", str(folder)))


def run_main(argv: Sequence[str]) -> tuple[int | None, str, str, BaseException | None]:
    """``sparsealloc.cli.main.main(argv)`` with stdout and stderr captured; never raises."""
    from sparsealloc.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    raised = None
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    except BaseException as exc:  # noqa: BLE001 - a traceback is exactly what the case must not produce
        raised = exc
    return code, out.getvalue(), err.getvalue(), raised


@contextlib.contextmanager
def counting_model_loads() -> Iterator[list[int]]:
    """Count models loaded by ``load_model`` (wherever the CLI reaches it from)."""
    from sparsealloc.pruning.model import models
    from sparsealloc.search import session

    real = models.load_model
    calls = [0]

    def counted(*args, **kwargs):
        loaded = real(*args, **kwargs)
        calls[0] += 1  # counts models actually loaded, not attempts that fail on the name or device
        return loaded

    with mock.patch.object(models, "load_model", counted), mock.patch.object(session, "load_model", counted):
        yield calls


def run_case(case: Case, env: Env, folder: Path) -> Result:
    """Run ``case`` in ``folder`` (created empty) and check that it ends cleanly."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, content in case.files:
        target = folder / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(substitute(content, env, folder), encoding="utf-8")
    if case.prepare:
        PREPARE[case.prepare](folder, env)
    argv = [substitute(arg, env, folder) for arg in case.argv]
    before = store_snapshot(env.store_url)
    with counting_model_loads() as loads:
        code, out, err, raised = run_main(argv)
    result = Result(case, code, err, model_loads=loads[0])
    problems = result.problems
    if raised is not None:
        problems.append(f"raised {type(raised).__name__}: {str(raised)[:200]}")
    if "Traceback" in out + err:
        problems.append("traceback printed")
    if code != 2:
        problems.append(f"exit code {code}, expected 2")
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, expected 1")
    elif not lines[0].startswith("error: "):
        problems.append(f"stderr does not start with 'error: ': {lines[0][:100]!r}")
    else:
        missing = [f for f in (substitute(f, env, folder) for f in case.fragments) if f not in lines[0]]
        if missing:
            problems.append(f"error line lacks {missing}: {lines[0][:300]!r}")
    if "hunter2" in out + err:
        problems.append("a password was printed")
    if store_snapshot(env.store_url) != before:
        problems.append("the existing store changed")
    created = [p for p in env.root.glob(f"{env.fresh_path.name}*")]
    if created:
        problems.append("a new store was created")
        for path in created:
            path.unlink()
    if result.model_loads and not case.needs_model:
        problems.append(f"the model was loaded {result.model_loads} time(s) before the error")
    return result


# ---------------------------------------------------------------------------------- random sample
BAD_SPEC_VALUES: dict[str, tuple[Any, ...]] = {
    "target_sparsity": (-0.1, 1.0, 7, "half", True, None, [0.5], {"a": 1}),
    "space": (5, [], ["magic"], ["layerwise", "layerwise"], ["layerwise", "allocator"], [None], "kv,nothing"),
    "objectives": ([], ["latency"], ["kv_bytes"], ["kl", "kl"], 3, [[1]]),
    "sampler": ("hyperband", "", 3, None, ["tpe"]),
    "trials": (0, -1, 2.5, "ten", True, None),
    "population_size": (0, -4, 1.5, "big", False),
    "timeout": (0, -1, "soon", float("inf"), [1]),
    "seed": ("abc", 1.5, True, [0]),
    "name": ("", " x", "x" * 201, "tab\there", 5, None, ["n"]),
    "pattern": ("3:2", "2:2", "a:b", 4, "dense"),
    "warm_start": (["sunshine"], 5, [None]),
    "layerwise": (5, "block", {"granularity": "row"}, {"radius": 0}, {"radius": 1}, {"bins": 0},
                  {"bins": True}, {"step": -0.1}, {"max_sparsity": 2}, {"extra": 1}),
    "kv": ({"bits": [1]}, {"bits": 4}, {"bits": []}, {"group_size": 0}, {"separate_kv": "yes"}, {"bitz": [4]}),
    "metric": ({"exponent_range": [2, 1]}, {"exponent_range": 5}, {"exponent_range": [0, "x"]},
               {"params": [1]}, {"name": ""}, {"nam": "wanda"}),
    "calibration": ({"samples": 0}, {"seq_len": -2}, {"batch_size": 1.5}, {"seed": "x"}, {"text": 5},
                    {"text": "a", "dataset": "b"}, {"sample": 4}),
    "validation": ({"top_k": -1}, {"windows": 0}, {"seq_len": "long"}, {"text": 3}),
    "device": (5, ["cpu"], ""),
}


def random_spec_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` specs that are valid but for one field set to a value outside its domain (seeded)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        key = rng.choice(sorted(BAD_SPEC_VALUES))
        value = rng.choice(BAD_SPEC_VALUES[key])
        body = {"model": "<model>", "calibration": {"text": "<text>", "samples": 4, "seq_len": 16}, "trials": 2}
        if key == "calibration" and isinstance(value, dict):
            body["calibration"] = {**body["calibration"], **value}
        else:
            body[key] = value
        suffix = rng.choice(("yaml", "json"))
        text = json.dumps(body) if suffix == "json" else _yaml(body)
        cases.append(Case(f"random-spec-{i}-{key}", "spec",
                          ("--quiet", "study", "run", f"<file:spec.{suffix}>", "--storage", "<fresh>", "--no-validate"),
                          files=((f"spec.{suffix}", text),)))
    return cases


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, allow_unicode=True)


BAD_FLAG_VALUES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("--target-sparsity",), ("-0.5", "1", "1.0001", "abc", "nan", "inf", "")),
    (("--radius",), ("0", "1", "-1", "x")),
    (("--trials",), ("0", "-3", "2.5", "many")),
    (("--population-size",), ("0", "-1", "x")),
    (("--calib-samples", "--calib-seq-len"), ("0", "-1", "1.5", "x")),
    (("--timeout",), ("0", "-1", "nan", "inf", "x")),
    (("--sampler",), ("hyperband", "TPE", "")),
    (("--space",), ("", "magic", "layerwise,layerwise", "layerwise,allocator")),
    (("--objectives",), ("", "kv_bytes", "kl,kl", "latency")),
    (("--granularity",), ("row", "", "BLOCK")),
    (("--metric",), ("wandda", "", "Wanda")),
    (("--device",), ("banana", "cuda:9", "")),
    (("--workers",), ("-1", "x")),
    (("--seed",), ("x", "1.5")),
    (("--storage",), ("", "x", "http://h/db", "sqlite://", "sqlite:////nonexistent_dir/s.db",
                      f"postgresql+psycopg2://postgres@127.0.0.1:{CLOSED_PORT}/x")),
)


def random_cli_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` ``study run`` command lines that are valid but for one flag given a bad value (seeded)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        flags, values = rng.choice(BAD_FLAG_VALUES)
        flag, value = rng.choice(flags), rng.choice(values)
        argv = [*RUN_FRESH]
        if flag == "--storage":
            argv[argv.index("<fresh>")] = value
        else:
            argv += [flag, value]
        cases.append(Case(f"random-cli-{i}{flag}={value}", "cli", tuple(argv)))
    return cases


def random_storage_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` store URLs built from bad schemes, closed ports, missing or unusable paths (seeded)."""
    rng = random.Random(seed)
    schemes = ("http", "ftp", "redis", "mongodb", "sqlite3", "postgres", "oracle", "mssql")
    builders = (
        lambda: f"{rng.choice(schemes)}://127.0.0.1/{rng.randrange(100)}",
        lambda: f"postgresql+psycopg2://u@127.0.0.1:{CLOSED_PORT}/db{rng.randrange(100)}",
        lambda: f"postgresql+psycopg2://u@127.0.0.1:{rng.randrange(65536, 10 ** 6)}/db",
        lambda: f"sqlite:////nonexistent_dir_{rng.randrange(1000)}/s.db",
        lambda: f"sqlite:///<dir>/no/such/dir/{rng.randrange(1000)}.db",
        lambda: "sqlite:///<text>",
        lambda: "sqlite:///<dir>",
        lambda: f"store{rng.randrange(100)}.{rng.choice(('txt', 'json', 'csv', ''))}",
        lambda: rng.choice(("sqlite://", "sqlite:///:memory:", "", " ", "://")),
    )
    return [storage_case(f"random-storage-{i}", rng.choice(builders)()) for i in range(n)]
