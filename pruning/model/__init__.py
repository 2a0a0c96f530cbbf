"""Model loading and structure: what a model is before any weight is pruned, and how it is read and written.

:mod:`~sparsealloc.pruning.model.models` resolves a ``--model`` source (Hub id, folder, GGUF, the
embedded SmolLM2) and loads it; :mod:`~sparsealloc.pruning.model.structure` finds the decoder blocks
and prunable Linears (:class:`~sparsealloc.pruning.model.structure.ModelLayout`);
:mod:`~sparsealloc.pruning.model.checkpoint_formats` writes and reads pruned checkpoints (dense at a
dtype, or compressed-tensors sparse-bitmask); :mod:`~sparsealloc.pruning.model.evaluation` measures
perplexity and sparsity, and :mod:`~sparsealloc.pruning.model.lm_harness` runs lm-evaluation-harness
tasks. Nothing here imports the KV-cache modules; the one link to weight pruning is the lazy import of
:func:`~sparsealloc.pruning.apply.save_pruned` inside
:func:`~sparsealloc.pruning.model.checkpoint_formats.save_checkpoint`.
"""
