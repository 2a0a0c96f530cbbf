"""Removing whole decoder blocks from a model, in place."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from sparsealloc.pruning.model.structure import find_blocks, language_config


def drop_blocks_(model: nn.Module, block_names: Sequence[str]) -> list[int]:
    """Remove decoder blocks by FQN; renumber the rest so KV caches and configs stay consistent.

    Returns:
        Indices (in the original model) of the removed blocks.
    """
    if not block_names:
        return []
    path, blocks = find_blocks(model)
    dropped = sorted(int(name.rsplit(".", 1)[1]) for name in block_names)
    new_list = nn.ModuleList([block for i, block in enumerate(blocks) if i not in set(dropped)])
    parent_name, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new_list)
    for new_index, block in enumerate(new_list):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = language_config(model)
    if config is not None:
        config.num_hidden_layers = len(new_list)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == len(blocks):
            config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(dropped)]
    return dropped


@contextmanager
def blocks_removed(model: nn.Module, block_names: Sequence[str]) -> Iterator[None]:
    """Run with the named decoder blocks taken out, then put everything back as it was.

    The study's layer-drop dimension uses this instead of :func:`drop_blocks_`: every trial scores
    a different set of dropped blocks on the same model, so the removal must be undone (block list,
    ``layer_idx`` numbering and the config's layer count and types). While inside, module FQNs of
    later blocks are renumbered: look modules up by name before entering (prune first, then score).
    """
    if not block_names:
        yield
        return
    path, blocks = find_blocks(model)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, attr)
    config = language_config(model)
    saved_config = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types") if hasattr(config, k)}
    saved_idx = [(m, m.layer_idx) for block in blocks for m in block.modules() if hasattr(m, "layer_idx")]
    drop_blocks_(model, block_names)
    try:
        yield
    finally:
        setattr(parent, attr, original)
        for module, index in saved_idx:
            module.layer_idx = index
        for key, value in saved_config.items():
            setattr(config, key, value)
