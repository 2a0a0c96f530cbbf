"""Simulated KV-cache quantization: numerics, layout and the attention hook."""

import pytest
import torch

from sparsealloc.pruning.kv.quant import fake_quant, kv_fake_quant, quantize_kv


def test_fake_quant_hand_example():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    # 1 bit, one group: levels {0, 3}; 1.0 -> 0, 2.0 -> 3.
    assert torch.equal(fake_quant(x, 1, 4, dim=-1), torch.tensor([[0.0, 0.0, 3.0, 3.0]]))
    # 2 bits: 4 levels {0,1,2,3} reproduce x exactly.
    assert torch.allclose(fake_quant(x, 2, 4, dim=-1), x)


def test_sixteen_bits_is_identity_and_error_shrinks_with_bits():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 8)
    assert fake_quant(x, 16, 4, dim=-2) is x
    errors = [(fake_quant(x, b, 4, dim=-2) - x).abs().max().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05


def test_groups_follow_kivi_layout():
    # Keys per channel: a channel with a huge value must not disturb other channels.
    # (batch 1, head 1, tokens 4, channels 4); channel 2 holds an outlier at token 1.
    key = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 100.0, 0.0], [2.0, 0.0, 0.0, 1.0], [3.0, 2.0, 0.0, 0.0]])
    key = key.reshape(1, 1, 4, 4)
    qk, qv = quantize_kv(key, key.clone(), 2, 2, 4)
    # Keys are grouped per channel (along tokens): channel 0 = 0,1,2,3 is exact at 2 bits.
    assert torch.allclose(qk[0, 0, :, 0], key[0, 0, :, 0])
    # Values are grouped per token (along channels): token 1 shares its group with the outlier.
    assert not torch.allclose(qv[0, 0, 1, :2], key[0, 0, 1, :2])
    # token 0 = 0,0,0,1: two levels, exact up to the fp16 scale (1/3 is stored as 0.33325)
    assert torch.allclose(qv[0, 0, 0], key[0, 0, 0], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hook_changes_logits_only_inside_block(family, model_builder, windows_builder):
    model = model_builder(family)
    ids = windows_builder(2, 12)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        attention = [n for n, _ in model.named_modules() if n.endswith("self_attn")]
        with kv_fake_quant(model, {n: {"k": 16, "v": 16} for n in attention}):
            same = model(input_ids=ids).logits
        with kv_fake_quant(model, {attention[0]: {"k": 2, "v": 2}}, group_size=4):
            low = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(dense, same)
    assert (low - dense).abs().max() > 1e-4
    assert torch.equal(dense, after)


def test_residual_regions_follow_the_cache():
    from sparsealloc.pruning.kv.quant import residual_regions

    key_full, value_full = residual_regions(6, residual=2, group_size=2)
    # After token t the cache holds t+1 tokens: values of all but the 2 newest are quantized,
    # keys only in whole groups of 2 with at least 2 newer tokens left in full precision.
    assert value_full.int().argmax(1).tolist() == [0, 0, 1, 2, 3, 4]
    assert key_full.int().argmax(1).tolist() == [0, 0, 0, 2, 2, 4]


def test_residual_window_keeps_recent_tokens_exact(model_builder, windows_builder):
    model = model_builder("llama")
    ids = windows_builder(2, 19, seed=5)
    attention = [n for n, _ in model.named_modules() if n.endswith("self_attn")]
    bits = {n: {"k": 2, "v": 2} for n in attention}
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        gaps = []
        for residual in (0, 4, 12, 19):
            with kv_fake_quant(model, bits, group_size=4, residual=residual):
                gaps.append((model(input_ids=ids).logits - dense).abs().mean().item())
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[3] < 1e-6  # the whole sequence inside the window: nothing quantized


def test_padding_mask_reaches_the_quantized_attention(model_builder, windows_builder):
    model = model_builder("llama")
    seq = windows_builder(1, 12, seed=6)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    positions = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.arange(12)[None]], dim=1)
    attention = [n for n, _ in model.named_modules() if n.endswith("self_attn")]
    with torch.no_grad(), kv_fake_quant(model, {n: {"k": 16, "v": 2} for n in attention}, group_size=4):
        alone = model(input_ids=seq).logits
        with_pad = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(with_pad[:, 4:], alone, atol=1e-5)
