"""The packed quantized KV cache: bit packing, quantizer round trip, what it holds, bytes, generation."""

import pytest
import torch
from transformers import DynamicCache

from sparsealloc.core.errors import IncompatiblePlanError, SpecError
from sparsealloc.objectives.kv_memory import kv_bytes_per_token, kv_cache_bytes
from sparsealloc.pruning.kv.cache import PackedKVLayer, packed_cache
from sparsealloc.pruning.kv.generation import cache_kwargs
from sparsealloc.pruning.kv.pack import pack_codes, packed_width, unpack_codes
from sparsealloc.pruning.kv.quant import (
    dequantize_groups,
    fake_quant,
    key_quantized_length,
    kv_fake_quant,
    quantize_groups,
    value_quantized_length,
)
from sparsealloc.pruning.model.structure import model_layout


# ----------------------------------------------------------------------------------------- packing
def test_pack_hand_examples():
    # 2 bits, 4 codes per byte, code i at bits 2i: 1 | 2<<2 | 3<<4 = 57; padded run -> 2 bytes.
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [57, 0]
    # 3 bits: 8 codes in 3 bytes; all ones fill all 24 bits.
    assert pack_codes(torch.full((8,), 7, dtype=torch.uint8), 3).tolist() == [255, 255, 255]
    # 3 bits: code 1 at slot 3 sits at bit 9 = bit 1 of byte 1.
    assert pack_codes(torch.tensor([0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.uint8), 3).tolist() == [0, 2, 0]
    assert pack_codes(torch.tensor([15, 1], dtype=torch.uint8), 4).tolist() == [31, 0, 0, 0]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 21, 64])
def test_pack_unpack_is_exact_and_as_small_as_the_bits(bits, n):
    gen = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 2**bits, (2, 3, 5, n), generator=gen).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, packed_width(n, bits))
    assert packed_width(n, bits) == (n if bits == 8 else -(-n // 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


# -------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_error_is_at_most_half_a_step(bits):
    torch.manual_seed(bits)
    x = torch.randn(4, 3, 64) * torch.linspace(0.1, 10, 64)  # channels of very different ranges
    codes, scale, zero = quantize_groups(x, bits, 16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == (4, 3, 4)
    error = (dequantize_groups(codes, scale, zero, 16, x.dtype) - x).abs()
    step = scale.float().repeat_interleave(16, dim=-1)
    # Half a step from rounding, plus the fp16 rounding of the zero point (2^-11 relative).
    assert bool((error <= 0.5 * step + zero.float().abs().repeat_interleave(16, -1) * 2**-10 + 1e-6).all())
    errors = {b: (fake_quant(x, b, 16, dim=-1) - x).abs().mean().item() for b in (2, 3, 4, 8)}
    assert errors[2] > errors[3] > errors[4] > errors[8]


# ------------------------------------------------------------------------------ what the cache holds
def feed(layer: PackedKVLayer, key: torch.Tensor, value: torch.Tensor, chunks: list[int]):
    """Update ``layer`` with consecutive chunks of tokens; yield (tokens so far, returned K, V)."""
    start = 0
    for size in chunks:
        k, v = layer.update(key[..., start : start + size, :], value[..., start : start + size, :])
        start += size
        yield start, k, v


@pytest.mark.parametrize(("residual", "group_size", "chunks"), [
    (0, 4, [1] * 19), (4, 4, [1] * 19), (3, 4, [7, 1, 1, 5, 1, 4]), (6, 8, [19]), (0, 8, [9, 10]),
])
def test_the_cache_holds_exactly_what_the_simulation_assumes(residual, group_size, chunks):
    torch.manual_seed(0)
    key = torch.randn(2, 3, 19, 16).half()
    value = torch.randn(2, 3, 19, 16).half()
    layer = PackedKVLayer(3, 2, group_size, residual)
    fq_key = fake_quant(key, 3, group_size, dim=-2)
    fq_value = fake_quant(value, 2, group_size, dim=-1)
    for n, k, v in feed(layer, key, value, chunks):
        qk, qv = key_quantized_length(n, residual, group_size), value_quantized_length(n, residual)
        assert layer.key_codes.shape[-2] == qk and layer.value_codes.shape[-2] == qv
        assert layer.keys.shape[-2] == n - qk <= residual + group_size - 1
        assert layer.values.shape[-2] == n - qv <= residual
        assert torch.equal(k, torch.cat([fq_key[..., :qk, :], key[..., qk:n, :]], dim=-2))
        assert torch.equal(v, torch.cat([fq_value[..., :qv, :], value[..., qv:n, :]], dim=-2))
    assert layer.get_seq_length() == 19


def test_sixteen_bit_layers_store_fp16_plainly():
    key = torch.randn(1, 2, 5, 8)
    layer = PackedKVLayer(16, 16)
    k, v = layer.update(key, key * 2)
    assert layer.keys.dtype == torch.float16 and layer.key_codes.numel() == 0
    assert k.dtype == torch.float32 and torch.equal(k, key.half().float())
    assert layer.nbytes() == 2 * key.numel() * 2


@pytest.mark.parametrize(("k_bits", "v_bits"), [(2, 2), (3, 3), (4, 8), (8, 16), (16, 16), (2, 16)])
@pytest.mark.parametrize(("residual", "group_size", "n"), [(0, 8, 37), (0, 16, 64), (5, 8, 37), (16, 16, 3)])
def test_measured_bytes_equal_the_exact_analytic_count(k_bits, v_bits, residual, group_size, n):
    torch.manual_seed(1)
    key, value = torch.randn(2, 3, n, 24), torch.randn(2, 3, n, 24)
    layer = PackedKVLayer(k_bits, v_bits, group_size, residual)
    for _ in feed(layer, key, value, [min(5, n)] + [1] * (n - min(5, n))):
        pass
    held = sum(t.element_size() * t.numel() for _, t in layer.tensors())
    assert layer.nbytes() == held  # no tensor keeps a larger storage alive
    bits = {"attn": {"k": k_bits, "v": v_bits}}
    assert layer.nbytes() == kv_cache_bytes(["attn"], bits, 3, 24, n, group_size, residual, batch=2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_smollm2_geometry_512_generated_tokens_within_5_percent_of_the_objective(bits):
    """SmolLM2-135M: 30 layers, 3 KV heads, head dim 64; an 8-token prompt, 512 generated tokens.

    The cache holds prompt + 511 tokens (the last generated token is never fed back). All layers
    are alike, so one layer is measured and multiplied by 30.
    """
    n = 8 + 511
    torch.manual_seed(2)
    key, value = torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64)
    layer = PackedKVLayer(bits, bits, 32, 0)
    for _ in feed(layer, key, value, [8] + [1] * 511):
        pass
    attention = [f"model.layers.{i}.self_attn" for i in range(30)]
    kv_bits = {a: {"k": bits, "v": bits} for a in attention}
    measured = 30 * layer.nbytes()
    assert measured == kv_cache_bytes(attention, kv_bits, 3, 64, n, 32)
    objective = kv_bytes_per_token(attention, kv_bits, 3, 64, 32) * n
    assert abs(measured / objective - 1) < 0.05


def test_bad_bits_and_unknown_modules_are_rejected(tiny_llama):
    with pytest.raises(SpecError, match="k_bits must be one of"):
        PackedKVLayer(k_bits=12)
    layout = model_layout(tiny_llama)
    with pytest.raises(IncompatiblePlanError, match="model.layers.9.self_attn"):
        packed_cache(layout, {"model.layers.9.self_attn": {"k": 4, "v": 4}})
    cache = packed_cache(layout, {layout.attention[1]: {"k": 4, "v": 2}}, dropped_layers=["model.layers.0"])
    assert [(layer.k_bits, layer.v_bits) for layer in cache.layers] == [(4, 2), (16, 16), (16, 16)]


# ------------------------------------------------------------------------------------- generation
def test_sixteen_bit_cache_generates_what_a_dynamic_cache_generates(model_builder, windows_builder):
    model = model_builder("llama").half()  # the 16-bit cache stores fp16: identical to DynamicCache
    layout = model_layout(model)
    prompt = windows_builder(2, 6, seed=4)
    cache = packed_cache(layout, {})
    with torch.no_grad():
        ours = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=24, do_sample=False)
        plain = model.generate(prompt, **cache_kwargs(model, DynamicCache()), max_new_tokens=24, do_sample=False)
    assert torch.equal(ours, plain)
    assert cache.get_seq_length() == 6 + 23
    assert cache.nbytes() == kv_cache_bytes(layout.attention, {}, 2, 16, 29, batch=2)


def test_decoding_through_the_cache_matches_the_residual_simulation(model_builder, windows_builder):
    """Token-by-token decoding through the packed cache vs one prefill with the simulated cache.

    Quantization turns rounding noise into whole steps now and then, so the two agree closely
    rather than exactly: much closer than either is to the unquantized model.
    """
    model = model_builder("llama")
    layout = model_layout(model)
    ids = windows_builder(2, 19, seed=3)
    kv_bits = {a: {"k": 2 + i % 3, "v": 4 - i % 3} for i, a in enumerate(layout.attention)}
    with torch.no_grad():
        cache = packed_cache(layout, kv_bits, group_size=4, residual=4)
        decoded = torch.cat([model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True).logits
                             for t in range(ids.shape[1])], dim=1)
        with kv_fake_quant(model, kv_bits, group_size=4, residual=4):
            simulated = model(input_ids=ids, use_cache=False).logits
        dense = model(input_ids=ids, use_cache=False).logits
    gap = (decoded - simulated).abs().max().item()
    effect = (simulated - dense).abs().max().item()
    assert effect > 1e-3 and gap < 0.25 * effect


def test_cache_argument_named_as_the_installed_transformers_names_it():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; older releases reject ``cache``."""
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert cache_kwargs(Old(), "c") == {"past_key_values": "c"} and cache_kwargs(New(), "c") == {"cache": "c"}
