"""Bytes of the packed KV-cache layout, per token (pure arithmetic; no torch).

The storage format of :mod:`sparsealloc.pruning.kv.cache` (KIVI-style asymmetric group quantization,
Liu et al. 2024, arXiv:2402.02750): a b-bit tensor (b < 16) stores its codes packed (``ceil(D/8)·b``
bytes per token and head, 8 codes in b bytes; ``D`` bytes at 8 bits) plus an fp16 scale and an fp16
zero per group; keys are grouped along tokens (``D`` groups per ``group_size`` tokens), values along
channels (``ceil(D/group_size)`` groups per token). 16-bit stores 2 bytes per element. Defined once
here for the cache, the ``kv_bytes`` objective and byte budgets of the search space.
"""

from __future__ import annotations

FULL_PRECISION_BYTES = 2  # fp16 / bf16: the 16-bit setting and the residual window
GROUP_PARAM_BYTES = 4  # fp16 scale + fp16 zero per group


def packed_width(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits (rounded up to whole runs of 8 codes below 8 bits)."""
    if bits == 8:
        return n
    return -(-n // 8) * bits


def key_bytes_per_token(bits: int, head_dim: int, group_size: int) -> float:
    """Bytes one token's key costs in one head once the cache is long (group parameters amortized)."""
    if bits >= 16:
        return float(FULL_PRECISION_BYTES * head_dim)
    return packed_width(head_dim, bits) + head_dim * GROUP_PARAM_BYTES / group_size


def value_bytes_per_token(bits: int, head_dim: int, group_size: int) -> float:
    """Bytes one token's value costs in one head."""
    if bits >= 16:
        return float(FULL_PRECISION_BYTES * head_dim)
    return packed_width(head_dim, bits) + -(-head_dim // group_size) * GROUP_PARAM_BYTES
