"""Analytic KV-cache bytes per token for per-layer K/V bit-widths (no model forward).

Per attention layer and token: ``H_kv · D`` elements for K and as many for V. A b-bit tensor
(b < 16) stores b/8 bytes per element plus, per group of ``group_size`` elements, an fp16 scale and
an fp16 zero point (KIVI-style asymmetric group quantization); 16-bit stores 2 bytes per element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def bytes_per_element(bits: int, group_size: int = 32) -> float:
    """Storage per element for ``bits``, scale and zero point included."""
    if bits >= 16:
        return 2.0
    return bits / 8 + 4.0 / group_size


def kv_bytes_per_token(attention: Sequence[str], kv_bits: Mapping[str, Mapping[str, int]],
                       n_kv_heads: int, head_dim: int, group_size: int = 32) -> float:
    """KV-cache bytes one token costs over all ``attention`` layers (16-bit where not in ``kv_bits``)."""
    per_layer = n_kv_heads * head_dim
    total = 0.0
    for name in attention:
        bits = kv_bits.get(name, {"k": 16, "v": 16})
        total += per_layer * (bytes_per_element(bits["k"], group_size) + bytes_per_element(bits["v"], group_size))
    return total


def kv_geometry(config) -> tuple[int, int]:
    """(number of KV heads, head dim) from a transformers config (text config for multimodal)."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)
