"""Simulated per-layer KV-cache quantization for the study proxy (prefill included).

transformers' ``QuantizedCache`` never quantizes the prefill pass, so a single calibration forward
through it is identical to fp16 and cannot score bit-widths. Instead an attention function
registered with ``AttentionInterface`` fake-quantizes the keys and values each attention layer
sees, as a KIVI-style cache would store them (Liu et al. 2024, arXiv:2402.02750): asymmetric
round-to-nearest in groups, **keys per channel** (groups of ``group_size`` tokens of one channel),
**values per token** (groups of ``group_size`` channels of one token). Keys are post-RoPE and
pre-``repeat_kv``, as a real cache holds them.

Bits are set per attention module FQN (``plan.kv_bits``) as a module attribute, so no global map is
needed and layers without bits run unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

ATTENTION_NAME = "sparsealloc_kv_fake_quant"
_ATTR = "_sparsealloc_kv_bits"
_registered = False


def fake_quant(x: Tensor, bits: int, group_size: int, dim: int) -> Tensor:
    """Quantize-dequantize ``x`` with ``bits`` in contiguous groups of ``group_size`` along ``dim``.

    Asymmetric (min/max) round-to-nearest; 16 bits or more returns ``x`` unchanged. A trailing
    partial group is quantized on its own.
    """
    if bits >= 16:
        return x
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    pad = (-n) % group_size
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    groups = moved.reshape(*moved.shape[:-1], -1, group_size).float()
    lo = groups.amin(-1, keepdim=True)
    hi = groups.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = (hi - lo).clamp_min(1e-8) / levels
    q = ((groups - lo) / scale).round().clamp(0, levels) * scale + lo
    out = q.reshape(*moved.shape[:-1], -1)[..., :n].to(x.dtype)
    return out.movedim(-1, dim)


def quantize_kv(key: Tensor, value: Tensor, k_bits: int, v_bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """KIVI layout on tensors shaped (batch, kv_heads, tokens, head_dim)."""
    return fake_quant(key, k_bits, group_size, dim=-2), fake_quant(value, v_bits, group_size, dim=-1)


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bits = getattr(module, _ATTR, None)
    if bits is not None:
        key, value = quantize_kv(key, value, *bits)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _attention)
        _registered = True


@contextmanager
def kv_fake_quant(model: nn.Module, kv_bits: Mapping[str, Mapping[str, int]], group_size: int = 32) -> Iterator[None]:
    """Within the block, attention layers named in ``kv_bits`` see quantized K/V.

    Args:
        model: A transformers model whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        kv_bits: {attention FQN: {"k": bits, "v": bits}}.
        group_size: Quantization group size.
    """
    active = {name: bits for name, bits in kv_bits.items() if min(bits["k"], bits["v"]) < 16}
    if not active:
        yield
        return
    _register()
    modules = dict(model.named_modules())
    previous = model.config._attn_implementation
    for name, bits in active.items():
        setattr(modules[name], _ATTR, (int(bits["k"]), int(bits["v"]), group_size))
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        for name in active:
            if hasattr(modules[name], _ATTR):
                delattr(modules[name], _ATTR)
        model.set_attn_implementation(previous)
