"""The one forward pass of the dense model that collects every metric's input statistics.

Forward pre-hooks on every prunable Linear accumulate Σx², Σx, the token count and, on request,
XᵀX (:class:`~sparsealloc.core.types.LayerStats`) over calibration windows drawn by
:mod:`sparsealloc.pruning.calibration.text`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sparsealloc.core.progress import track
from sparsealloc.core.types import LayerStats
from sparsealloc.pruning.model.structure import ModelLayout, model_layout


class _StatsCollector:
    """Forward pre-hooks accumulating Σx², Σx, count (and XᵀX) per Linear input.

    Linears fed the very same tensor (q/k/v, gate/up) share one :class:`LayerStats` object: the
    first batch records which tensor each one saw, later batches skip the duplicates.
    """

    def __init__(self, gram: bool) -> None:
        self.gram = gram
        self.stats: dict[str, LayerStats] = {}
        self.owner: dict[str, str] = {}
        self._recent: deque[tuple[torch.Tensor, str]] = deque(maxlen=8)

    def hook(self, fqn: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if fqn not in self.owner:
                shared = next((name for t, name in self._recent if t is x), None)
                self.owner[fqn] = shared or fqn
                self._recent.append((x, fqn))
            owner = self.owner[fqn]
            if owner != fqn:
                self.stats[fqn] = self.stats[owner]
                return
            self._accumulate(fqn, x)

        return pre_hook

    def _accumulate(self, fqn: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        s = self.stats.get(fqn)
        if s is None:
            d = x2.shape[1]
            zeros = torch.zeros(d, device=x2.device)
            gram = torch.zeros(d, d, device=x2.device) if self.gram else None
            s = self.stats[fqn] = LayerStats(zeros.clone(), zeros.clone(), 0, gram)
        s.sum_sq += (x2 * x2).sum(0)
        s.sum += x2.sum(0)
        s.count += x2.shape[0]
        if s.gram is not None:
            s.gram.addmm_(x2.T, x2)


def decoder_trunk(model: nn.Module) -> nn.Module:
    """The model without its LM head (statistics need no logits)."""
    get_decoder = getattr(model, "get_decoder", None)
    trunk = get_decoder() if callable(get_decoder) else None
    return trunk if isinstance(trunk, nn.Module) else model


@torch.inference_mode()
def collect_stats(
    model: nn.Module,
    windows: torch.Tensor | Sequence[Mapping[str, torch.Tensor]],
    batch_size: int = 4,
    gram: bool = False,
    layout: ModelLayout | None = None,
) -> dict[str, LayerStats]:
    """Run the dense model once over ``windows`` and return input statistics per Linear FQN.

    Args:
        model: A causal LM (see :mod:`sparsealloc.pruning.model.structure`).
        windows: Token ids, shape (n, seq_len), run through the language model alone; or, for
            multimodal models such as LLaVA, a sequence of ready input batches (mappings like
            ``{"input_ids", "pixel_values", "attention_mask"}``) run through the whole model, so the
            language model's Linears see the projected image features at the image tokens.
        batch_size: Windows per forward call (token-id windows only).
        gram: Also accumulate XᵀX (in × in per distinct input; SparseGPT, Gram-based proxies).
        layout: Precomputed layout of ``model``.

    Returns:
        FQN → :class:`LayerStats` (Linears fed the same input share one object).
    """
    layout = layout or model_layout(model)
    modules = dict(model.named_modules())
    collector = _StatsCollector(gram)
    handles = [modules[name].register_forward_pre_hook(collector.hook(name)) for name in layout.linears]
    device = next(model.parameters()).device
    trunk = decoder_trunk(model)
    try:
        batches = windows.split(batch_size) if isinstance(windows, torch.Tensor) else list(windows)
        for batch in track(batches, desc="calibration", total=len(batches), unit="batch"):
            if isinstance(batch, torch.Tensor):
                trunk(input_ids=batch.to(device), use_cache=False)
            else:
                model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: collector.stats[name] for name in layout.linears}


def stats_sharing(stats: Mapping[str, LayerStats]) -> dict[str, list[str]]:
    """Group FQNs that share one statistics object (same input tensor)."""
    groups: dict[int, list[str]] = {}
    for name, s in stats.items():
        groups.setdefault(id(s), []).append(name)
    return {names[0]: names for names in groups.values()}
