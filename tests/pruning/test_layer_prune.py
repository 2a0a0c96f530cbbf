"""Block Influence and Prune&Comp: BI and α as defined, exact fusion, iterative loop, a case that matters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sparsealloc.core.errors import SpecError
from sparsealloc.pruning.layer_drop import drop_blocks_
from sparsealloc.pruning.layer_prune import (
    block_influence,
    block_statistics,
    compensate_,
    prune_layers_,
)
from sparsealloc.pruning.model.structure import model_layout


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_bi_and_alpha_match_their_definitions(model_builder, windows_builder):
    model = model_builder("llama")
    ids = windows_builder(3, 12, 1)
    hs = hidden_states(model, ids)  # hs[i] = input of block i (i < 4); hs[4] is after the final norm
    bi, alphas = block_statistics(model, ids, batch_size=2)
    assert len(bi) == len(alphas) == 4
    for i in range(3):
        h_in, h_out = hs[i].reshape(-1, 64), hs[i + 1].reshape(-1, 64)
        expected_bi = (1 - F.cosine_similarity(h_in, h_out, dim=-1)).sum().item()
        expected_alpha = (h_out.abs().mean(0) / h_in.abs().mean(0)).mean().item()
        assert bi[i] == pytest.approx(expected_bi, rel=1e-4)
        assert alphas[i] == pytest.approx(expected_alpha, rel=1e-4)
    assert list(block_influence(model, ids)) == list(model_layout(model).blocks)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_compensation_scales_the_stream_entering_the_block(model_builder, windows_builder, arch):
    overrides = {} if arch == "opt" else {"rms_norm_eps": 1e-12}  # norms exactly scale-invariant
    model = model_builder(arch, **overrides)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):  # OPT's eps is not a config field
            module.eps = 1e-12
    ids = windows_builder(2, 10, 2)
    before = hidden_states(model, ids)
    layout = model_layout(model)
    compensate_(model, {layout.blocks[2]: 2.5})
    after = hidden_states(model, ids)
    for i in range(3):  # stream after the embeddings, block 0 and block 1: all × 2.5
        torch.testing.assert_close(after[i], 2.5 * before[i], rtol=2e-3, atol=1e-5)
    assert not torch.allclose(after[3], 2.5 * before[3], rtol=1e-2)  # block 2 adds its unscaled output


def test_compensation_unties_a_shared_lm_head(model_builder, windows_builder, tmp_path):
    model = model_builder("llama", tie_word_embeddings=True)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.data_ptr() == embed.weight.data_ptr()
    original = embed.weight.detach().clone()
    compensate_(model, {"model.layers.1": 3.0})
    torch.testing.assert_close(model.get_input_embeddings().weight, 3.0 * original)
    torch.testing.assert_close(model.get_output_embeddings().weight, original)  # logits not rescaled
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = windows_builder(1, 8, 0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def _scaling_block_opt(model_builder, c: float = 0.1):
    """Tiny OPT whose block 2 nearly rescales the stream: h ← h + c·LN(h) (ReLU pair = identity)."""
    model = model_builder("opt", ffn_dim=128)
    block = model.model.decoder.layers[2]
    eye = torch.eye(64)
    with torch.no_grad():
        block.self_attn.out_proj.weight.zero_()
        block.self_attn.out_proj.bias.zero_()
        block.fc1.weight.copy_(torch.cat([eye, -eye]))
        block.fc1.bias.zero_()
        block.fc2.weight.copy_(c * torch.cat([eye, -eye], dim=1))
        block.fc2.bias.zero_()
        block.final_layer_norm.weight.fill_(1.0)
        block.final_layer_norm.bias.zero_()
    return model


def test_compensation_lowers_the_error_of_dropping_a_scaling_block(model_builder, windows_builder):
    model = _scaling_block_opt(model_builder)
    ids = windows_builder(6, 16, 0)
    with torch.no_grad():
        dense = model.model(input_ids=ids).last_hidden_state
    bi, alphas = block_statistics(model, ids)
    assert min(range(4), key=bi.__getitem__) == 2 and alphas[2] > 2  # lowest BI, large magnitude gain
    errors = {}
    for compensate in (False, True):
        pruned = copy.deepcopy(model)
        result = prune_layers_(pruned, ids, 1, compensate=compensate)
        assert result.dropped == ["model.decoder.layers.2"]
        with torch.no_grad():
            errors[compensate] = (pruned.model(input_ids=ids).last_hidden_state - dense).pow(2).mean().item()
    assert errors[True] < 0.05 * errors[False]
    assert result.alphas[0] == pytest.approx(alphas[2])


def test_iterative_loop_equals_compensate_then_drop(model_builder, windows_builder):
    ids = windows_builder(4, 12, 3)
    model = model_builder("mistral")
    result = prune_layers_(model, ids, 2)
    assert len(set(result.dropped)) == 2 and len(model_layout(model).blocks) == 2
    assert model.config.num_hidden_layers == 2
    assert all(a > 0 for a in result.alphas) and len(result.influence) == 2
    assert result.provenance()["layer_prune"]["compensation"] == result.scales
    # Scales commute: fusing every α into the original model, then dropping, gives the same weights.
    replay = model_builder("mistral")
    compensate_(replay, result.scales)
    drop_blocks_(replay, result.dropped)
    for (name, p), (_, q) in zip(model.named_parameters(), replay.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_bad_requests(model_builder, windows_builder):
    model = model_builder("llama")
    with pytest.raises(SpecError):
        prune_layers_(model, windows_builder(1, 8, 0), 4)
    with pytest.raises(SpecError, match="model.layers.9"):
        compensate_(model, {"model.layers.9": 1.1})
