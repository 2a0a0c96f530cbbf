"""A real per-layer quantized KV cache for generation: packed low-bit codes plus fp16 scales and zeros.

Each attention layer gets a :class:`PackedKVLayer` (a transformers ``DynamicLayer``) with its own K
and V bit-widths. Quantization is KIVI's (Liu et al. 2024, arXiv:2402.02750) and the very same
function the study's proxy simulates (:func:`sparsealloc.pruning.kv.quant.quantize_groups`):

* **keys per channel**: groups of ``group_size`` consecutive tokens of one channel; a group is
  quantized once it is complete and at least ``residual`` newer tokens stay in full precision
  (:func:`~sparsealloc.pruning.kv.quant.key_quantized_length`);
* **values per token**: groups of ``group_size`` channels of one token; a token's value is quantized
  as soon as it is older than the ``residual`` newest
  (:func:`~sparsealloc.pruning.kv.quant.value_quantized_length`).

Quantized codes are bit-packed (:mod:`sparsealloc.pruning.kv.pack`: 8 codes in ``b`` bytes, 3-bit
included) along the head dimension, with one fp16 scale and one fp16 zero per group. The
full-precision part (the residual window, and every token of a 16-bit K or V) is stored as fp16
(bf16 for bf16 models). Reads dequantize the whole cache into the model's dtype for attention, so
memory is saved at rest, not in the attention kernel. :meth:`PackedKVLayer.nbytes` counts the
storage of every tensor held; :func:`sparsealloc.objectives.kv_memory.kv_cache_bytes` predicts it.

Greedy and sampled decoding only: beam search and assisted decoding are not supported (the cache
cannot be cropped; reordering is).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from sparsealloc.core.errors import IncompatiblePlanError, SpecError
from sparsealloc.pruning.kv.pack import pack_codes, packed_width, unpack_codes
from sparsealloc.pruning.kv.quant import (
    dequantize_groups,
    key_quantized_length,
    quantize_groups,
    value_quantized_length,
)
from sparsealloc.pruning.model.structure import ModelLayout

CACHE_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the full-precision part: the model's if it is fp16 or bf16, else fp16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


class PackedKVLayer(DynamicLayer):
    """One attention layer's cache (see module docstring).

    Args:
        k_bits: Key bits (16: stored as 16-bit floats, unquantized).
        v_bits: Value bits.
        group_size: Quantization group size (tokens for keys, channels for values).
        residual: Full-precision window of recent tokens.
    """

    is_croppable = False

    def __init__(self, k_bits: int = 16, v_bits: int = 16, group_size: int = 32, residual: int = 0) -> None:
        super().__init__()
        for name, bits in (("k_bits", k_bits), ("v_bits", v_bits)):
            if bits not in CACHE_BITS:
                raise SpecError(f"{name} must be one of {list(CACHE_BITS)}, but got {bits!r}")
        if group_size < 1 or residual < 0:
            raise SpecError(f"expected group_size >= 1 and residual >= 0, but got {group_size} and {residual}")
        self.k_bits, self.v_bits = int(k_bits), int(v_bits)
        self.group_size, self.residual = int(group_size), int(residual)
        self.cumulative_length = 0
        self._clear()

    def __repr__(self) -> str:
        return f"PackedKVLayer(k={self.k_bits}, v={self.v_bits}, group={self.group_size}, residual={self.residual})"

    def _clear(self) -> None:
        self.keys = self.values = None  # full-precision part (DynamicLayer's names)
        self.key_codes = self.key_scale = self.key_zero = None
        self.value_codes = self.value_scale = self.value_zero = None
        self.head_dim = 0
        self.is_initialized = False

    # ------------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        store = storage_dtype(key_states.dtype)
        b, h, _, d = key_states.shape
        self.head_dim = d
        empty = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=self.device)  # noqa: E731
        self.keys, self.values = empty(b, h, 0, d, dtype=store), empty(b, h, 0, d, dtype=store)
        self.key_codes, self.value_codes = (empty(b, h, 0, self._width(bits), dtype=torch.uint8)
                                            for bits in (self.k_bits, self.v_bits))
        self.key_scale, self.key_zero = empty(b, h, 0, d, dtype=torch.float16), empty(b, h, 0, d, dtype=torch.float16)
        groups = -(-d // self.group_size)
        self.value_scale, self.value_zero = (empty(b, h, 0, groups, dtype=torch.float16) for _ in range(2))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens, quantize what left the residual window, return all K and V dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store = self.keys.dtype
        self.keys = torch.cat([self.keys, key_states.to(store)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(store)], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self._flush_keys()
        self._flush_values()
        return self.dequantized(key_states.dtype)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        self.cumulative_length = 0
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------------ storage
    _NAMES = ("keys", "values", "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) of everything the layer holds."""
        for name in self._NAMES:
            tensor = getattr(self, name)
            if tensor is not None:
                yield name, tensor

    def nbytes(self) -> int:
        """Bytes of storage held: the full storage behind every tensor (no hidden views)."""
        return sum(t.untyped_storage().nbytes() for _, t in self.tensors())

    def _map(self, fn) -> None:
        if self.is_initialized:
            for name, tensor in list(self.tensors()):
                setattr(self, name, fn(tensor))

    def _width(self, bits: int) -> int:
        return 0 if bits >= 16 else packed_width(self.head_dim, bits)

    # ------------------------------------------------------------------------ quantization
    def _flush_keys(self) -> None:
        if self.k_bits >= 16:
            return
        done = self.key_codes.shape[-2]
        move = key_quantized_length(self.cumulative_length, self.residual, self.group_size) - done
        if move <= 0:
            return
        chunk = self.keys[..., :move, :].transpose(-1, -2)  # (b, h, d, move): groups along tokens
        codes, scale, zero = quantize_groups(chunk, self.k_bits, self.group_size)
        self.key_codes = torch.cat([self.key_codes, pack_codes(codes.transpose(-1, -2), self.k_bits)], dim=-2)
        self.key_scale = torch.cat([self.key_scale, scale.transpose(-1, -2)], dim=-2)
        self.key_zero = torch.cat([self.key_zero, zero.transpose(-1, -2)], dim=-2)
        self.keys = self.keys[..., move:, :].clone()  # a copy, so the moved tokens' storage is freed

    def _flush_values(self) -> None:
        if self.v_bits >= 16:
            return
        done = self.value_codes.shape[-2]
        move = value_quantized_length(self.cumulative_length, self.residual) - done
        if move <= 0:
            return
        codes, scale, zero = quantize_groups(self.values[..., :move, :], self.v_bits, self.group_size)
        self.value_codes = torch.cat([self.value_codes, pack_codes(codes, self.v_bits)], dim=-2)
        self.value_scale = torch.cat([self.value_scale, scale], dim=-2)
        self.value_zero = torch.cat([self.value_zero, zero], dim=-2)
        self.values = self.values[..., move:, :].clone()

    def dequantized(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """All cached keys and values, shape (batch, kv_heads, tokens, head_dim), in ``dtype``."""
        dtype = dtype or self.dtype
        keys, values = self.keys.to(dtype), self.values.to(dtype)
        d, g = self.head_dim, self.group_size
        if self.key_codes is not None and self.key_codes.shape[-2]:
            codes = unpack_codes(self.key_codes, self.k_bits, d).transpose(-1, -2)
            old = dequantize_groups(codes, self.key_scale.transpose(-1, -2), self.key_zero.transpose(-1, -2), g, dtype)
            keys = torch.cat([old.transpose(-1, -2), keys], dim=-2)
        if self.value_codes is not None and self.value_codes.shape[-2]:
            codes = unpack_codes(self.value_codes, self.v_bits, d)
            values = torch.cat([dequantize_groups(codes, self.value_scale, self.value_zero, g, dtype), values], dim=-2)
        return keys, values


class PackedKVCache(Cache):
    """A transformers ``Cache`` of :class:`PackedKVLayer` objects (one per decoder layer)."""

    def __init__(self, layers: Sequence[PackedKVLayer]) -> None:
        super().__init__(layers=list(layers))

    def nbytes(self) -> int:
        """Bytes held by all layers."""
        return sum(layer.nbytes() for layer in self.layers)


def packed_cache(layout: ModelLayout, kv_bits: Mapping[str, Mapping[str, int]], group_size: int = 32,
                 residual: int = 0, dropped_layers: Sequence[str] = ()) -> PackedKVCache:
    """One :class:`PackedKVLayer` per attention module of ``layout`` (16-bit where ``kv_bits`` has none).

    Args:
        layout: Layout of the model *before* any block was dropped (the plan's names refer to it).
        kv_bits: {attention FQN: {"k": bits, "v": bits}} (``plan.kv_bits``).
        group_size: Quantization group size.
        residual: Full-precision window of recent tokens.
        dropped_layers: Block FQNs the plan removed; their attention gets no cache layer.

    Raises:
        IncompatiblePlanError: ``kv_bits`` names a module that is not an attention module of the model.
    """
    unknown = sorted(set(kv_bits) - set(layout.attention))
    if unknown:
        raise IncompatiblePlanError(
            f"kv_bits must name attention modules such as {layout.attention[0]!r}, but got {unknown[0]!r}"
            + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""))
    dropped = tuple(f"{name}." for name in dropped_layers)
    kept = [kv_bits.get(name, {"k": 16, "v": 16}) for name in layout.attention if not name.startswith(dropped)]
    return PackedKVCache([PackedKVLayer(int(bits["k"]), int(bits["v"]), group_size, residual) for bits in kept])
