"""``sparsealloc calib select`` on the tiny Llama; the selected set fed to prune and to a study."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sparsealloc.cli.main import main
from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan
from sparsealloc.pruning import collect_stats, load_model, model_layout, prune_
from sparsealloc.pruning.calibration.select import (
    candidate_offsets,
    read_calibration_set,
    select_calibration_set,
    window_features,
)
from sparsealloc.pruning.calibration.text import tokenize_stream
from sparsealloc.spaces.spec import StudySpec


def select_args(model_dir: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["--quiet", "calib", "select", "--model", str(model_dir), "--calib-text", str(text), "--n", "4",
            "--pool", "12", "--calib-seq-len", "16", "--k", "3", "--out", str(out), *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def ssp_set(tiny_llama_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    assert main(select_args(tiny_llama_dir, text_file, out, "--metric", "ssp")) == 0
    return out


def test_select_writes_header_and_windows(ssp_set, tiny_llama_dir, text_file, tiny_tokenizer):
    header, *windows = lines(ssp_set)
    assert header["format"] == "sparsealloc.calibration-set" and header["version"] == 1
    assert header["model"] == str(tiny_llama_dir) and header["source"] == f"file:{text_file}"
    assert (header["metric"], header["keep"], header["n"], header["pool"], header["k"], header["seed"]) == \
        ("ssp", "hard", 4, 12, 3, 0)
    assert header["vocab_size"] == len(tiny_tokenizer) and header["layer"] == "model.layers.2"
    assert len(windows) == 4
    stream = tokenize_stream(tiny_tokenizer, text_file.read_text())
    allowed = set(candidate_offsets(stream.numel(), 12, 16, seed=0))
    for rank, window in enumerate(windows):
        assert window["index"] == rank and window["offset"] in allowed
        assert window["input_ids"] == stream[window["offset"]: window["offset"] + 16].tolist()
        assert window["text"] == tiny_tokenizer.decode(window["input_ids"])
        assert 0 <= window["cluster"] < 3
    scores = [w["score"] for w in windows]
    assert scores == sorted(scores, reverse=True)  # hardest first


def test_select_is_deterministic_given_the_seed(ssp_set, tiny_llama_dir, text_file, tmp_path):
    again = tmp_path / "again.jsonl"
    assert main(select_args(tiny_llama_dir, text_file, again, "--metric", "ssp")) == 0
    assert again.read_bytes() == ssp_set.read_bytes()
    other = tmp_path / "other.jsonl"
    assert main(select_args(tiny_llama_dir, text_file, other, "--metric", "ssp", "--seed", "1")) == 0
    assert other.read_bytes() != ssp_set.read_bytes()


def test_loss_metric_scores_are_dense_losses(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "loss.jsonl"
    assert main(select_args(tiny_llama_dir, text_file, out, "--metric", "loss", "--keep", "easy")) == 0
    assert "windows: 4" in capsys.readouterr().out
    header, *windows = lines(out)
    assert header["metric"] == "loss" and header["k"] is None
    scores = [w["score"] for w in windows]
    assert scores == sorted(scores)  # easiest first
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor([w["input_ids"] for w in windows])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(w["cluster"] is None for w in windows)


def test_balanced_takes_every_cluster(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "balanced.jsonl"
    assert main(select_args(tiny_llama_dir, text_file, out, "--metric", "ssp", "--balanced")) == 0
    _, *windows = lines(out)
    assert sorted({w["cluster"] for w in windows}) == [0, 1, 2]


def test_embeddings_are_the_blocks_mean_pooled_output(tiny_llama, windows_builder):
    windows = windows_builder(5, 12, seed=3)
    features = window_features(tiny_llama, windows, "model.layers.1", {"embeddings"}, batch_size=2)
    with torch.inference_mode():
        hidden = tiny_llama(input_ids=windows, output_hidden_states=True).hidden_states[2]  # after block 1
    assert features.losses is None
    assert torch.allclose(features.embeddings, hidden[:, 1:].mean(1), atol=1e-5)


def test_random_metric_runs_no_forward_and_differs_by_seed(tiny_llama, tiny_tokenizer):
    stream = torch.arange(3, 120).repeat(4)
    a = select_calibration_set(tiny_llama, tiny_tokenizer, stream, 5, metric="random", seq_len=8, pool=20)
    b = select_calibration_set(tiny_llama, tiny_tokenizer, stream, 5, metric="random", seq_len=8, pool=20, seed=1)
    assert a.windows.shape == (5, 8) and not torch.equal(a.windows, b.windows)
    assert a.header["layer"] == "model.layers.2" and a.header["k"] is None


# --------------------------------------------------------------------------- prune and study take the set
def test_prune_uses_the_selected_windows(ssp_set, tiny_llama_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    code = main(["--quiet", "prune", "--model", str(tiny_llama_dir), "--calib-windows", str(ssp_set),
                 "--sparsity", "0.5", "--eval-text", str(text_file), "--eval-seq-len", "16", "--eval-windows", "2",
                 "--save", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = AllocationPlan.load(out_dir / "plan.json")
    calibration = plan.provenance["calibration"]
    assert calibration["source"] == f"windows:{ssp_set}" and calibration["samples"] == 4
    assert calibration["seq_len"] == 16 and calibration["selection"]["metric"] == "ssp"

    # the checkpoint equals pruning in-process with the file's windows
    model, _, _ = load_model(str(tiny_llama_dir), device="cpu")
    layout = model_layout(model)
    stats = collect_stats(model, read_calibration_set(ssp_set).windows, layout=layout)
    prune_(model, plan, stats, layout=layout)
    saved = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    mine, theirs = dict(model.named_modules()), dict(saved.named_modules())
    for name in layout.linears:
        assert torch.equal(mine[name].weight == 0, theirs[name].weight == 0), name


def test_study_evaluator_uses_the_selected_windows(ssp_set, tiny_llama_dir, text_file):
    from sparsealloc.search.session import build_evaluator

    model, tokenizer, _ = load_model(str(tiny_llama_dir), device="cpu")
    spec = StudySpec.from_dict({"model": str(tiny_llama_dir), "calibration": {"windows_file": str(ssp_set)}})
    evaluator = build_evaluator(spec, model, tokenizer)
    assert torch.equal(evaluator.ctx.windows, read_calibration_set(ssp_set).windows)
    with pytest.raises(SpecError, match="one of text, dataset, windows_file or domains"):
        StudySpec.from_dict({"calibration": {"windows_file": str(ssp_set), "text": str(text_file)}})


def test_study_run_accepts_the_selected_windows(ssp_set, tiny_llama_dir, text_file, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    code = main(["--quiet", "study", "run", "--name", "sel", "--storage", url, "--model", str(tiny_llama_dir),
                 "--calib-windows", str(ssp_set), "--target-sparsity", "0.5", "--trials", "3", "--no-validate"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    import optuna

    study = optuna.load_study(study_name="sel", storage=url)
    assert study.user_attrs["sparsealloc:spec"]["calibration"]["windows_file"] == str(ssp_set)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3


# --------------------------------------------------------------------------- bad input: one line, exit 2
def write_set(path: Path, header: dict | str, *windows: dict | str) -> Path:
    rows = [h if isinstance(h, str) else json.dumps(h) for h in (header, *windows)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


GOOD_HEADER = {"format": "sparsealloc.calibration-set", "version": 1, "vocab_size": 128, "seq_len": 4}


@pytest.mark.parametrize(("rows", "message"), [
    (("",), "with a header line"),
    (("{not json",), "JSON object on line 1"),
    (("[1, 2]",), "JSON object on line 1"),
    (({**GOOD_HEADER, "format": "csv"},), "format 'sparsealloc.calibration-set'"),
    (({**GOOD_HEADER, "version": 7},), "version 1"),
    (({**GOOD_HEADER, "seq_len": "long"},), "integer seq_len"),
    ((GOOD_HEADER,), "at least one window"),
    ((GOOD_HEADER, {"input_ids": [5, 6, 7]}), "expected 4 token ids"),
    ((GOOD_HEADER, {"input_ids": "abcd"}), "list of integers"),
    ((GOOD_HEADER, {"input_ids": [5, 6, 7, 999]}), r"token ids in \[0, 128\)"),
    ((GOOD_HEADER, {"input_ids": [5, 6, 7, 8]}, "oops"), "JSON object on line 3"),
    (({**GOOD_HEADER, "vocab_size": 50000}, {"input_ids": [5, 6, 7, 8]}), "this model's tokenizer"),
])
def test_prune_rejects_malformed_sets(rows, message, tiny_llama_dir, tmp_path, capsys):
    path = write_set(tmp_path / "bad.jsonl", *rows) if rows != ("",) else tmp_path / "empty.jsonl"
    if rows == ("",):
        path.write_text("\n")
    code = main(["--quiet", "prune", "--model", str(tiny_llama_dir), "--calib-windows", str(path), "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize(("extra", "message"), [
    (["--metric", "el2n"], "unknown calibration selection metric 'el2n'; expected one of: loss, random, ssp"),
    (["--metric", "loss", "--balanced"], "--balanced with --metric ssp"),
    (["--n", "20"], "--n ≤ --pool"),
    (["--k", "30"], "--k ≤ --pool"),
    (["--keep", "middle"], "invalid choice"),
    (["--layer", "9"], r"embedding layer in \[-4, 3\]"),
])
def test_select_rejects_bad_flags(extra, message, tiny_llama_dir, text_file, tmp_path, capsys):
    code = main(select_args(tiny_llama_dir, text_file, tmp_path / "x.jsonl", *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "x.jsonl").exists()


def test_select_rejects_a_pool_larger_than_the_text(tiny_llama_dir, text_file, tmp_path, capsys):
    code = main(select_args(tiny_llama_dir, text_file, tmp_path / "x.jsonl", "--pool", "500"))
    err = capsys.readouterr().err
    assert code == 2 and "candidate pool of at most" in err


def test_windows_with_other_flags_is_a_usage_error(ssp_set, tiny_llama_dir, text_file, capsys):
    code = main(["--quiet", "prune", "--model", str(tiny_llama_dir), "--calib-windows", str(ssp_set),
                 "--calib-text", str(text_file)])
    assert code == 2 and "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------- calib mix
def test_mix_draws_equal_shares_of_each_text_and_labels_them(tiny_llama_dir, text_file, tiny_tokenizer, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())), encoding="utf-8")
    out = tmp_path / "mix.jsonl"
    assert main(["--quiet", "calib", "mix", "--model", str(tiny_llama_dir), "--calib-text", str(text_file), str(other),
                 "--n", "5", "--calib-seq-len", "16", "--out", str(out)]) == 0
    header, *windows = lines(out)
    assert (header["metric"], header["n"], header["k"]) == ("mix", 5, 2)
    assert header["source"] == f"file:{text_file} | file:{other}"
    assert [w["cluster"] for w in windows] == [0, 0, 0, 1, 1]  # 5 = 3 + 2, the first text takes the extra one
    for window in windows:
        source = text_file if window["cluster"] == 0 else other
        stream = tokenize_stream(tiny_tokenizer, source.read_text())
        assert window["input_ids"] == stream[window["offset"]: window["offset"] + 16].tolist()
    assert len({w["offset"] for w in windows if w["cluster"] == 0}) == 3  # distinct windows
    # A study on the set draws its evo stage windows from its 5 windows, stratified by text.
    spec = StudySpec.from_dict({"name": "m", "sampler": "evo", "calibration": {"windows_file": str(out)}})
    from sparsealloc.search.samplers.evo import calibration_pool
    assert calibration_pool(spec) == (5, (0, 0, 0, 1, 1))


@pytest.mark.parametrize(("texts", "n", "message"), [
    (1, "4", "two or more --calib-text"),
    (2, "1", "at least one window per text"),
])
def test_mix_rejects_one_text_or_too_few_windows(texts, n, message, tiny_llama_dir, text_file, tmp_path, capsys):
    code = main(["--quiet", "calib", "mix", "--model", str(tiny_llama_dir), "--calib-text", *[str(text_file)] * texts,
                 "--n", n, "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "x.jsonl").exists()


def test_mix_names_a_missing_text(tiny_llama_dir, text_file, tmp_path, capsys):
    code = main(["--quiet", "calib", "mix", "--model", str(tiny_llama_dir), "--calib-text", str(text_file),
                 str(tmp_path / "nope.txt"), "--n", "4", "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.txt" in err and err.count("\n") == 1, err
