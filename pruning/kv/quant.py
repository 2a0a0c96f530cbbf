"""Per-layer KV-cache quantization: the group quantizer and its simulation in attention (prefill).

The quantizer is KIVI's (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv:2402.02750): asymmetric min/max round-to-nearest in groups of ``group_size``,
**keys per channel** (groups of ``group_size`` tokens of one channel), **values per token** (groups of
``group_size`` channels of one token). Scale and zero point are stored as fp16, as the real cache
(:mod:`sparsealloc.pruning.kv.cache`) stores them, so both dequantize to the same numbers. Keys are
post-RoPE and pre-``repeat_kv``, as a cache holds them.

transformers' ``QuantizedCache`` never quantizes the prefill pass, so a single calibration forward
through it is identical to fp16 and cannot score bit-widths. Instead an attention function
registered with ``AttentionInterface`` quantizes the keys and values each attention layer sees:

* ``residual=0``: every key and value is quantized (a trailing partial key group on its own). The
  real cache keeps an incomplete key group in full precision, so this errs on the pessimistic side.
* ``residual=R>0``: a full-precision window of recent tokens (KIVI's residual). Query ``t`` sees
  exactly what the real cache holds after token ``t`` was appended: keys before
  :func:`key_quantized_length` ``(t+1, R, G)`` and values before :func:`value_quantized_length`
  ``(t+1, R)`` quantized, the rest full precision. Computed with SDPA over the keys concatenated
  three times (quantized/quantized, full/quantized, full/full key/value pairs) and a mask that
  selects one copy per (query, key), so it costs about three times the attention of the plain pass.

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
#: Smallest positive fp16 (subnormal) number: the floor of a stored scale.
MIN_SCALE = 2.0**-24


# ------------------------------------------------------------------------------------ the quantizer
def quantize_groups(x: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest in contiguous groups of ``group_size`` along the last dim.

    A trailing partial group is quantized on its own.

    Returns:
        (codes uint8 shaped like ``x``, scale fp16 (..., groups), zero fp16 (..., groups)); the
        value of a code is ``code · scale + zero``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], but got {bits}")
    n = x.shape[-1]
    pad = (-n) % group_size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    groups = x.reshape(*x.shape[:-1], -1, group_size).float()
    lo = groups.amin(-1)
    hi = groups.amax(-1)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(MIN_SCALE).half()
    zero = lo.half()
    codes = ((groups - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels)
    return codes.to(torch.uint8).reshape(*x.shape[:-1], -1)[..., :n], scale, zero


def dequantize_groups(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`quantize_groups`: ``code · scale + zero`` per group, cast to ``dtype``."""
    n = codes.shape[-1]
    scale = scale.float().repeat_interleave(group_size, dim=-1)[..., :n]
    zero = zero.float().repeat_interleave(group_size, dim=-1)[..., :n]
    return (codes.float() * scale + zero).to(dtype)


def fake_quant(x: Tensor, bits: int, group_size: int, dim: int) -> Tensor:
    """Quantize-dequantize ``x`` with ``bits`` in contiguous groups of ``group_size`` along ``dim``.

    Asymmetric (min/max) round-to-nearest with fp16 scale and zero; 16 bits or more returns ``x``
    unchanged. A trailing partial group is quantized on its own.
    """
    if bits >= 16:
        return x
    moved = x.movedim(dim, -1)
    out = dequantize_groups(*quantize_groups(moved, bits, group_size), group_size, x.dtype)
    return out.movedim(-1, dim)


def quantize_kv(key: Tensor, value: Tensor, k_bits: int, v_bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """KIVI layout on tensors shaped (batch, kv_heads, tokens, head_dim)."""
    return fake_quant(key, k_bits, group_size, dim=-2), fake_quant(value, v_bits, group_size, dim=-1)


# ------------------------------------------------------------------ what the cache holds quantized
def key_quantized_length(n_tokens: int, residual: int, group_size: int) -> int:
    """Leading tokens whose keys a cache of ``n_tokens`` holds quantized.

    Keys are grouped along tokens, so only whole groups leave the full-precision window, and only
    once at least ``residual`` newer tokens remain in it: the window holds between ``residual`` and
    ``residual + group_size - 1`` tokens (fewer while the cache is shorter).
    """
    return max(n_tokens - residual, 0) // group_size * group_size


def value_quantized_length(n_tokens: int, residual: int) -> int:
    """Leading tokens whose values a cache of ``n_tokens`` holds quantized (all but the ``residual`` newest)."""
    return max(n_tokens - residual, 0)


def residual_regions(n: int, residual: int, group_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Per (query t, key s), whether the cache after token t holds key s / value s in full precision.

    Returns:
        (key_full, value_full): bool tensors of shape (n, n); causality is not applied.
    """
    t = torch.arange(n, device=device)
    seen = t + 1
    key_start = (seen - residual).clamp_min(0) // group_size * group_size
    value_start = (seen - residual).clamp_min(0)
    s = t[None, :]
    return s >= key_start[:, None], s >= value_start[:, None]


# -------------------------------------------------------------------------- the attention function
def _base_mask(attention_mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """Boolean (…, n, n) mask, True = attend: the model's mask, or causal when it passed none."""
    if attention_mask is None:
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive float mask


def _residual_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                        bits: tuple[int, int, int, int], **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    k_bits, v_bits, group_size, residual = bits
    qk, qv = quantize_kv(key, value, k_bits, v_bits, group_size)
    n = key.shape[-2]
    key_full, value_full = residual_regions(n, residual, group_size, key.device)
    # key_quantized_length <= value_quantized_length, so three (key, value) pairs cover every case.
    base = _base_mask(attention_mask, n, key.device)
    mask = torch.cat([base & ~key_full, base & key_full & ~value_full, base & value_full], dim=-1)
    keys = torch.cat([qk, key, key], dim=-2)
    values = torch.cat([qv, qv, value], dim=-2)
    return sdpa_attention_forward(module, query, keys, values, mask, **kwargs)


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bits = getattr(module, _ATTR, None)
    if bits is not None:
        k_bits, v_bits, group_size, residual = bits
        if residual > 0 and query.shape[-2] == key.shape[-2] > 1:
            return _residual_attention(module, query, key, value, attention_mask, bits, **kwargs)
        key, value = quantize_kv(key, value, k_bits, v_bits, group_size)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, _attention)
        # Without a mask function of its own a custom attention gets no mask at all (padding lost).
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True


@contextmanager
def kv_fake_quant(model: nn.Module, kv_bits: Mapping[str, Mapping[str, int]], group_size: int = 32,
                  residual: int = 0) -> Iterator[None]:
    """Within the block, attention layers named in ``kv_bits`` see quantized K/V.

    Args:
        model: A transformers model whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        kv_bits: {attention FQN: {"k": bits, "v": bits}}.
        group_size: Quantization group size.
        residual: Full-precision window of recent tokens (0: every token quantized); see the
            module docstring.
    """
    active = {name: bits for name, bits in kv_bits.items() if min(bits["k"], bits["v"]) < 16}
    if not active:
        yield
        return
    if residual < 0:
        raise ValueError(f"residual must be >= 0, but got {residual}")
    _register()
    modules = dict(model.named_modules())
    previous = model.config._attn_implementation
    for name, bits in active.items():
        setattr(modules[name], _ATTR, (int(bits["k"]), int(bits["v"]), group_size, int(residual)))
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        for name in active:
            if hasattr(modules[name], _ATTR):
                delattr(modules[name], _ATTR)
        model.set_attn_implementation(previous)
