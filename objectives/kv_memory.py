"""Analytic KV-cache memory for per-layer K/V bit-widths (no model forward).

Two views of the packed storage layout (:mod:`sparsealloc.core.kv_layout`, defined there once):

* :func:`kv_bytes_per_token` — the study objective ``kv_bytes``: what one more token costs once the
  cache is long, over all attention layers (``H_kv · D`` elements for K and as many for V per layer).
* :func:`kv_cache_bytes` — the exact bytes a cache of ``n`` tokens holds, including the
  full-precision part the per-token rate leaves out: the residual window of recent tokens and the
  incomplete key group (at most ``residual + group_size − 1`` tokens of keys and ``residual`` of
  values, in 16 bits). ``kv_cache_bytes(n) / n`` tends to the per-token rate as ``n`` grows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sparsealloc.core.kv_layout import (FULL_PRECISION_BYTES, GROUP_PARAM_BYTES, key_bytes_per_token,
                                        packed_width, value_bytes_per_token)
from sparsealloc.pruning.model.structure import kv_geometry  # noqa: F401  (re-exported)
from sparsealloc.pruning.kv.quant import key_quantized_length, value_quantized_length


def _bits(kv_bits: Mapping[str, Mapping[str, int]], name: str) -> tuple[int, int]:
    bits = kv_bits.get(name, {"k": 16, "v": 16})
    return int(bits["k"]), int(bits["v"])


def kv_bytes_per_token(attention: Sequence[str], kv_bits: Mapping[str, Mapping[str, int]],
                       n_kv_heads: int, head_dim: int, group_size: int = 32) -> float:
    """KV-cache bytes one token costs over all ``attention`` layers (16-bit where not in ``kv_bits``)."""
    total = 0.0
    for name in attention:
        k, v = _bits(kv_bits, name)
        total += n_kv_heads * (key_bytes_per_token(k, head_dim, group_size)
                               + value_bytes_per_token(v, head_dim, group_size))
    return total


def kv_cache_bytes(attention: Sequence[str], kv_bits: Mapping[str, Mapping[str, int]], n_kv_heads: int,
                   head_dim: int, n_tokens: int, group_size: int = 32, residual: int = 0, batch: int = 1) -> int:
    """Exact bytes a :class:`~sparsealloc.pruning.kv.cache.PackedKVCache` holds after ``n_tokens`` tokens.

    Args:
        attention: Attention module FQNs (one cache layer each).
        kv_bits: {attention FQN: {"k": bits, "v": bits}}; 16 where missing.
        n_kv_heads: Key/value heads per layer.
        head_dim: Head dimension.
        n_tokens: Tokens in the cache (prompt plus generated tokens fed back).
        group_size: Quantization group size.
        residual: Full-precision window of recent tokens.
        batch: Sequences in the batch.
    """
    total = 0
    full_token = FULL_PRECISION_BYTES * head_dim
    for name in attention:
        k, v = _bits(kv_bits, name)
        if k >= 16:
            key = n_tokens * full_token
        else:
            q = key_quantized_length(n_tokens, residual, group_size)
            key = q * packed_width(head_dim, k) + (q // group_size) * head_dim * GROUP_PARAM_BYTES
            key += (n_tokens - q) * full_token
        if v >= 16:
            value = n_tokens * full_token
        else:
            q = value_quantized_length(n_tokens, residual)
            value = q * (packed_width(head_dim, v) + -(-head_dim // group_size) * GROUP_PARAM_BYTES)
            value += (n_tokens - q) * full_token
        total += batch * n_kv_heads * (key + value)
    return total
