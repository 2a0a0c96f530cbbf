"""Bit-packing of b-bit integer codes (1 ≤ b ≤ 8) into bytes along the last dimension.

Layout: every run of 8 codes becomes exactly ``b`` bytes. Code ``i`` of a run occupies bits
``[i·b, (i+1)·b)`` of the run's ``8·b``-bit little-endian word, and byte ``j`` of the run is bits
``[8j, 8j+8)`` of that word. So 2-bit codes take 4 per byte, 4-bit 2 per byte, 8-bit 1 per byte,
and 3-bit 8 codes in 3 bytes: no bit is wasted for any width. The last dimension is zero-padded to a
multiple of 8 codes, so a row of ``n`` codes costs ``ceil(n / 8) · b`` bytes (8-bit codes are kept as
they are: ``n`` bytes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsealloc.core.kv_layout import packed_width  # noqa: F401  (re-exported: the cache uses it)


def _shifts(step: int, count: int, device: torch.device) -> Tensor:
    return torch.arange(count, device=device, dtype=torch.int64) * step


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` (each < 2**bits) along the last dim; returns uint8 (..., packed_width)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], but got {bits}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[-1]
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    runs = codes.reshape(*codes.shape[:-1], -1, 8).to(torch.int64)
    word = (runs << _shifts(bits, 8, codes.device)).sum(-1, keepdim=True)  # disjoint bits: sum == or
    packed = (word >> _shifts(8, bits, codes.device)) & 0xFF
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes (..., n)."""
    if bits == 8:
        return packed[..., :n]
    runs = packed.reshape(*packed.shape[:-1], -1, bits).to(torch.int64)
    word = (runs << _shifts(8, bits, packed.device)).sum(-1, keepdim=True)
    codes = (word >> _shifts(bits, 8, packed.device)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)[..., :n]
