"""Removing whole decoder blocks from a model, in place."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sparsealloc.pruning.structure import find_blocks


def drop_blocks_(model: nn.Module, block_names: Sequence[str]) -> list[int]:
    """Remove decoder blocks by FQN; renumber the rest so KV caches and configs stay consistent.

    Returns:
        Indices (in the original model) of the removed blocks.
    """
    if not block_names:
        return []
    path, blocks = find_blocks(model)
    dropped = sorted(int(name.rsplit(".", 1)[1]) for name in block_names)
    keep = [block for i, block in enumerate(blocks) if i not in set(dropped)]
    new_list = nn.ModuleList(keep)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new_list)
    for new_index, block in enumerate(new_list):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    if config is not None:
        config.num_hidden_layers = len(new_list)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == len(blocks):
            config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(dropped)]
    return dropped
