"""The KV cache: low-bit quantization of keys and values, for a study's proxy and for generation.

:mod:`~sparsealloc.pruning.kv.quant` is the KIVI-style asymmetric group quantization (keys per
channel, values per token, a full-precision residual window) that a study's trials simulate as fake
quantization inside attention; :mod:`~sparsealloc.pruning.kv.pack` bit-packs the integer codes;
:mod:`~sparsealloc.pruning.kv.cache` is ``PackedKVCache``, a transformers ``Cache`` that really
stores the packed codes; :mod:`~sparsealloc.pruning.kv.generation` generates text through a given
cache (the packed one in ``sparsealloc generate``). These modules depend on
:mod:`sparsealloc.pruning.model` (the layout) but on no weight-pruning module.
"""
