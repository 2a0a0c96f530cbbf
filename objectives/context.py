"""EvalContext: everything a worker builds once and every trial reuses.

Holds the model, the calibration windows, the statistics, one pristine copy of the prunable
weights (trials restore them in place; the model is never copied) and the dense reference.

The dense reference is memory-bounded: not the logits (N·L·vocab floats, 0.8 GB for SmolLM2 at
16×256), but the final hidden states (N·L·d) plus the LM head's Gram matrix G = WᵀW (d×d). Because
logits = h·Wᵀ (+ b), the logit difference of a pruned model is exactly ΔL = Δh·Wᵀ and
‖ΔL‖²_F = Σ_t Δh_t·G·Δh_tᵀ, with no vocabulary-sized product per trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.calibration import collect_stats, decoder_trunk
from sparsealloc.pruning.structure import ModelLayout, model_layout


def lm_head_of(model: nn.Module) -> nn.Module:
    """The output projection (``get_output_embeddings``)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings")
    return head


@dataclass
class EvalContext:
    """Per-worker cache (see module docstring). Build with :meth:`build`."""

    model: nn.Module
    layout: ModelLayout
    windows: torch.Tensor
    batch_size: int
    stats: Mapping[str, LayerStats]
    pristine_weight: dict[str, torch.Tensor]
    pristine_bias: dict[str, torch.Tensor | None]
    dense_hidden: list[torch.Tensor]
    head_gram: torch.Tensor
    dense_logit_sq: list[float]
    model_info: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    orders: dict[str, torch.Tensor] = field(default_factory=dict)
    orders_metric: Any = None
    dense_logprobs: list[torch.Tensor] = field(default_factory=list)
    drop_schedule: Any = None
    pristine_extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    @torch.inference_mode()
    def build(cls, model: nn.Module, windows: torch.Tensor, batch_size: int = 4, gram: bool = False,
              model_info: Mapping[str, Any] | None = None, tokenizer: Any = None) -> EvalContext:
        """Collect statistics, the pristine weights and the dense reference in one place."""
        layout = model_layout(model)
        stats = collect_stats(model, windows, batch_size=batch_size, gram=gram, layout=layout)
        modules = dict(model.named_modules())
        pristine_weight = {n: modules[n].weight.detach().clone() for n in layout.linears}
        pristine_bias = {n: None if modules[n].bias is None else modules[n].bias.detach().clone()
                         for n in layout.linears}
        head = lm_head_of(model)
        w = head.weight.detach().float()
        head_gram = w.T @ w  # (d, d)
        trunk = decoder_trunk(model)
        device = next(model.parameters()).device
        dense_hidden, dense_sq = [], []
        for batch in windows.split(batch_size):
            h = trunk(input_ids=batch.to(device), use_cache=False).last_hidden_state.float()
            dense_hidden.append(h)
            logits = head(h)
            dense_sq.append(float(logits.double().pow(2).sum()))
        info = {"n_layers": len(layout.blocks), **dict(model_info or {})}
        return cls(model, layout, windows, batch_size, stats, pristine_weight, pristine_bias,
                   dense_hidden, head_gram, dense_sq, info, tokenizer)

    @torch.no_grad()
    def restore_(self) -> None:
        """Put the dense weights (and biases) back, in place."""
        modules = dict(self.model.named_modules())
        for name, weight in self.pristine_weight.items():
            module = modules[name]
            module.weight.data.copy_(weight)
            bias = self.pristine_bias[name]
            if bias is None:
                module.bias = None
            else:
                module.bias.data.copy_(bias)
        for name, weight in self.pristine_extra.items():
            modules[name].weight.data.copy_(weight)

    @torch.inference_mode()
    def cache_orders(self, metric) -> None:
        """Score every prunable Linear once with ``metric`` (a MetricChoice) and keep its row order.

        With a fixed metric a trial's mask is then a slice of this order: no per-trial scoring or
        sorting (int16 indices: 2 bytes per weight).
        """
        from sparsealloc.pruning.masks import row_order
        from sparsealloc.pruning.metrics import score

        if self.orders_metric == metric:
            return
        self.orders = {n: row_order(score(metric.name, w, self.stats[n], dict(metric.params)))
                       for n, w in self.pristine_weight.items()}
        self.orders_metric = metric

    def cache_drop_schedule(self, max_blocks: int, compensate: bool = True) -> None:
        """Compute the Block-Influence drop schedule once (for the ``layer_drop`` dimension).

        With compensation, Prune&Comp scales the embeddings too, so they join the pristine copy
        (and a tied LM head is untied first, so that scaling never reaches the logits).
        """
        from sparsealloc.pruning.layer_prune import untie_output_embeddings_, drop_schedule

        if self.drop_schedule is not None and len(self.drop_schedule.dropped) >= max_blocks:
            return
        self.restore_()
        self.drop_schedule = drop_schedule(self.model, self.windows, max_blocks, compensate, self.batch_size)
        if compensate:
            untie_output_embeddings_(self.model)
            for name, module in self.model.named_modules():
                if module is self.model.get_input_embeddings() or (name.endswith("embed_positions") and hasattr(module, "weight")):
                    self.pristine_extra[name] = module.weight.detach().clone()

    @torch.inference_mode()
    def cache_dense_logprobs(self) -> None:
        """Keep the dense next-token log-probabilities (fp16) for the KL proxy."""
        if self.dense_logprobs:
            return
        head = lm_head_of(self.model)
        self.dense_logprobs = [torch.log_softmax(head(h), dim=-1).half() for h in self.dense_hidden]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_tokens(self) -> int:
        return int(self.windows.numel())

    def weights(self) -> dict[str, torch.Tensor]:
        """Dense weights per Linear FQN (for allocators)."""
        return self.pristine_weight
