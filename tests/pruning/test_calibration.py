"""Calibration windows, text sources, and the statistics pass over a tiny model."""

from __future__ import annotations

import pytest
import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.pruning.calibration.stats import collect_stats, stats_sharing
from sparsealloc.pruning.calibration.text import (TextSource, builtin_text, calibration_windows, sample_windows,
                                                  tokenize_stream)
from sparsealloc.pruning.model.structure import model_layout


# ----------------------------------------------------------------------------- windows
def test_sample_windows_shape_and_contiguity():
    stream = torch.arange(1000)
    windows = sample_windows(stream, 7, 32, seed=3)
    assert windows.shape == (7, 32)
    diffs = windows[:, 1:] - windows[:, :-1]
    assert (diffs == 1).all()  # consecutive tokens of the stream
    assert windows.min() >= 0 and windows.max() < 1000


def test_sample_windows_seeded():
    stream = torch.randint(0, 100, (5000,), generator=torch.Generator().manual_seed(0))
    a = sample_windows(stream, 8, 64, seed=0)
    b = sample_windows(stream, 8, 64, seed=0)
    c = sample_windows(stream, 8, 64, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_windows_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample_windows(torch.arange(100), 4, 8, seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("length", "n", "seq_len"), [(16, 2, 16), (10, 1, 32), (100, 0, 8), (100, 2, 1)])
def test_sample_windows_rejects(length, n, seq_len):
    with pytest.raises(SpecError):
        sample_windows(torch.arange(length), n, seq_len)


def test_too_short_text_message():
    with pytest.raises(SpecError, match="16 tokens"):
        sample_windows(torch.arange(16), 2, 16)


def test_tokenize_and_calibration_windows(tiny_tokenizer, text_file):
    source = TextSource("file", str(text_file))
    stream = tokenize_stream(tiny_tokenizer, source.read())
    assert stream.dim() == 1 and stream.numel() > 100
    assert int(stream.max()) < 128
    windows = calibration_windows(tiny_tokenizer, source, 4, 16, seed=2)
    assert torch.equal(windows, sample_windows(stream, 4, 16, seed=2))


# ----------------------------------------------------------------------------- text sources
def test_builtin_splits_are_disjoint_and_non_empty():
    calib, held_out, everything = builtin_text("calib"), builtin_text("eval"), builtin_text("all")
    assert len(calib) > 100_000 and len(held_out) > 100_000
    assert calib != held_out
    assert len(everything) >= len(calib) + len(held_out)
    # no 200-character passage of the evaluation text occurs in the calibration text
    chunks = [held_out[i : i + 200] for i in range(0, len(held_out) - 200, 200)]
    leaked = [chunk for chunk in chunks if chunk in calib]
    assert not leaked, f"{len(leaked)} of {len(chunks)} passages leak, e.g. {leaked[0]!r}"


def test_builtin_bad_split():
    with pytest.raises(SpecError, match="'train'"):
        builtin_text("train")


def test_text_source_builtin_and_max_chars():
    source = TextSource("builtin", "calib", max_chars=1000)
    assert source.read() == builtin_text("calib")[:1000]
    assert "calib" in source.describe()


def test_text_source_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert TextSource("file", str(path)).read() == "hello world\n"
    assert TextSource("file", str(path), max_chars=5).read() == "hello"


def test_text_source_missing_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(SpecError) as info:
        TextSource("file", str(missing)).read()
    assert str(missing) in str(info.value)


def test_text_source_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(SpecError, match="empty"):
        TextSource("file", str(empty)).read()


# ----------------------------------------------------------------------------- statistics
def _captured_inputs(model, windows, batch_size):
    """Inputs of every Linear, captured by our own hooks, flattened to (tokens, in)."""
    layout = model_layout(model)
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layout.linears}
    handles = [
        modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        )
        for name in layout.linears
    ]
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_collect_stats_matches_direct_computation(tiny_models, tiny_calib, arch):
    model = tiny_models[arch]
    stats = collect_stats(model, tiny_calib, batch_size=4, gram=True)
    inputs = _captured_inputs(model, tiny_calib, batch_size=4)
    layout = model_layout(model)
    assert list(stats) == list(layout.linears)
    for name in layout.linears:
        x = inputs[name].double()
        s = stats[name]
        assert s.count == tiny_calib.numel() == x.shape[0]
        torch.testing.assert_close(s.sum_sq.double(), (x * x).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.sum.double(), x.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.gram.double(), x.T @ x, rtol=1e-4, atol=1e-4)
        assert s.gram.shape == (layout.in_features[name],) * 2


def test_collect_stats_without_gram(tiny_llama, tiny_calib):
    stats = collect_stats(tiny_llama, tiny_calib, batch_size=6)
    assert all(s.gram is None for s in stats.values())


def test_collect_stats_batch_size_does_not_matter(tiny_llama, tiny_calib):
    a = collect_stats(tiny_llama, tiny_calib, batch_size=1)
    b = collect_stats(tiny_llama, tiny_calib, batch_size=6)
    for name in a:
        assert a[name].count == b[name].count
        torch.testing.assert_close(a[name].sum_sq, b[name].sum_sq, rtol=1e-5, atol=1e-5)


def test_collect_stats_removes_its_hooks(tiny_llama, tiny_calib):
    collect_stats(tiny_llama, tiny_calib)
    assert all(not m._forward_pre_hooks for m in tiny_llama.modules())


def test_qkv_and_gate_up_share_one_stats_object(tiny_llama, tiny_calib):
    stats = collect_stats(tiny_llama, tiny_calib)
    for i in range(4):
        p = f"model.layers.{i}"
        assert stats[f"{p}.self_attn.q_proj"] is stats[f"{p}.self_attn.k_proj"] is stats[f"{p}.self_attn.v_proj"]
        assert stats[f"{p}.mlp.gate_proj"] is stats[f"{p}.mlp.up_proj"]
        assert stats[f"{p}.self_attn.o_proj"] is not stats[f"{p}.self_attn.q_proj"]
        assert stats[f"{p}.mlp.down_proj"] is not stats[f"{p}.mlp.up_proj"]
    assert stats["model.layers.0.self_attn.q_proj"] is not stats["model.layers.1.self_attn.q_proj"]
    groups = stats_sharing(stats)
    assert len(groups) == 4 * 4
    assert groups["model.layers.0.self_attn.q_proj"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]


def test_memory_bounded_by_windows_not_context(model_builder, windows_builder):
    model = model_builder("llama", max_position_embeddings=1_000_000)
    windows = windows_builder(2, 8, seed=4)
    stats = collect_stats(model, windows, batch_size=2)
    assert all(s.count == 16 for s in stats.values())
    assert all(torch.isfinite(s.sum_sq).all() for s in stats.values())
    # nothing in the model is sized by the context length
    assert max(b.numel() for b in model.buffers()) < 1_000_000
