"""Where the decoder blocks, their Linear layers and their attention modules are in a model.

Works for any decoder-only transformers model whose blocks are an ``nn.ModuleList`` of
``config.num_hidden_layers`` entries holding ``nn.Linear`` layers (Llama, Mistral, Qwen2, OPT,
LLaVA's language model...). Everything is keyed by module FQN.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparsealloc.core.errors import SpecError


@dataclass(frozen=True)
class ModelLayout:
    """FQNs of the prunable parts of a model.

    Attributes:
        blocks_path: FQN of the ModuleList of decoder blocks ("model.layers").
        blocks: FQNs of the decoder blocks, in order.
        linears: FQNs of the prunable Linear layers (inside blocks), in order.
        block_of: Linear FQN → block FQN.
        attention: FQNs of the attention module of each block (for KV-cache bits), in order.
        numels: Linear FQN → number of weights.
        in_features: Linear FQN → input width.
        kv_heads: Key/value heads per attention layer (0 when the config does not say).
        head_dim: Head dimension (0 when the config does not say).
    """

    blocks_path: str
    blocks: tuple[str, ...]
    linears: tuple[str, ...]
    block_of: dict[str, str]
    attention: tuple[str, ...]
    numels: dict[str, int]
    in_features: dict[str, int]
    kv_heads: int = 0
    head_dim: int = 0

    def block_linears(self, block: str) -> list[str]:
        """Linear FQNs inside ``block``."""
        return [name for name in self.linears if self.block_of[name] == block]

    @property
    def total_params(self) -> int:
        """Weights in all prunable Linear layers."""
        return sum(self.numels.values())


def language_config(model: nn.Module):
    """The config of ``model``'s language model (``config.text_config`` of a multimodal model), or None."""
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (FQN, ModuleList) of the decoder blocks.

    Raises:
        SpecError: no ModuleList of Linear-holding blocks found.
    """
    config = language_config(model)
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            has_linear = any(isinstance(m, nn.Linear) for m in module[0].modules())
            if has_linear and (n_layers is None or len(module) == n_layers):
                if "vision" in name or "visual" in name:
                    continue
                candidates.append((name, module))
    if not candidates:
        raise SpecError(
            f"expected a decoder-only model whose blocks hold nn.Linear layers, but found no such "
            f"block list in {type(model).__name__}"
        )
    return candidates[0]


def model_layout(model: nn.Module) -> ModelLayout:
    """Describe the prunable structure of ``model`` (see :class:`ModelLayout`)."""
    path, blocks = find_blocks(model)
    block_names, linears, block_of, attention, numels, in_features = [], [], {}, [], {}, {}
    for index, block in enumerate(blocks):
        block_name = f"{path}.{index}"
        block_names.append(block_name)
        attn = None
        for sub_name, module in block.named_modules():
            fqn = f"{block_name}.{sub_name}" if sub_name else block_name
            if isinstance(module, nn.Linear):
                linears.append(fqn)
                block_of[fqn] = block_name
                numels[fqn] = module.weight.numel()
                in_features[fqn] = module.in_features
            elif attn is None and sub_name and "attn" in sub_name.split(".")[-1].lower():
                attn = fqn
        if attn is not None:
            attention.append(attn)
    return ModelLayout(
        blocks_path=path,
        blocks=tuple(block_names),
        linears=tuple(linears),
        block_of=block_of,
        attention=tuple(attention),
        numels=numels,
        in_features=in_features,
        **dict(zip(("kv_heads", "head_dim"), _geometry(model))),
    )


def kv_geometry(config) -> tuple[int, int]:
    """(number of KV heads, head dim) from a transformers config (text config for multimodal)."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)


def _geometry(model: nn.Module) -> tuple[int, int]:
    try:
        return kv_geometry(language_config(model))
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0, 0
