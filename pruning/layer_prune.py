"""Layer (block) pruning by Block Influence with Prune&Comp magnitude compensation.

* Block Influence (ShortGPT-style, as in chenxinrui-tsinghua/PruneAndComp ``CosSim_BI.py``):
  ``BI_ℓ = Σ_tokens (1 − cos(h_ℓ^in, h_ℓ^out))`` over calibration windows, NaN cosines counted as
  0.5; the block with the lowest BI changes the residual stream least.
* Prune&Comp (Chen et al., AAAI 2026, arXiv:2507.18212; ``magcomp.get_scale_params`` /
  ``fuse_scale``): removing block i leaves the residual stream entering block i+1 too small by
  ``α = mean_c [E|h_{i+1,c}| / E|h_{i,c}|]`` (a scalar). Multiplying everything that writes into
  the stream before block i by α — the token (and position) embeddings and the attention / MLP
  output projections of every block l < i — rescales the stream arriving at the gap by exactly α,
  because every block reads the stream through a scale-invariant norm (RMSNorm / LayerNorm, up to
  eps). This holds for pre-norm models whose sub-layer outputs enter the stream unnormalised
  (Llama, Mistral, Qwen2, pre-LN OPT), not for post-LN (OPT-350m) or sandwich-norm (Gemma-2/3)
  blocks. A tied LM head is untied first, so that the logits are not rescaled.
* Iterative loop: recompute BI on the current (pruned, compensated) model, drop the argmin,
  fuse its α; K times.

Compensation changes weights, so an :class:`~sparsealloc.core.plan.AllocationPlan`
(``dropped_layers``) alone does not reproduce it. It is kept as the explicit step
:func:`compensate_` (scales per dropped block, keyed by the block FQN of the *original* model,
applied before the blocks are dropped), so plans stay weight-free; :meth:`LayerPruneResult.provenance`
gives the scales to record in a plan's free-form provenance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsealloc.core.errors import SpecError
from sparsealloc.core.plan import AllocationPlan, weighted_mean_sparsity
from sparsealloc.pruning.calibration.stats import decoder_trunk
from sparsealloc.pruning.layer_drop import drop_blocks_
from sparsealloc.pruning.metrics import is_output_projection
from sparsealloc.pruning.model.structure import find_blocks, model_layout
from sparsealloc.spaces.budget import budget_with_removed


@dataclass
class LayerPruneResult:
    """What :func:`prune_layers_` removed.

    Attributes:
        dropped: FQNs (in the original model) of the removed blocks, in removal order.
        alphas: Prune&Comp scale fused for each removed block (1.0 without compensation).
        influence: BI of each removed block when it was chosen.
    """

    dropped: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    influence: list[float] = field(default_factory=list)

    @property
    def scales(self) -> dict[str, float]:
        """Dropped block FQN → α (the argument of :func:`compensate_`)."""
        return dict(zip(self.dropped, self.alphas))

    def provenance(self) -> dict[str, object]:
        """JSON-ready record for ``AllocationPlan.provenance``."""
        return {"layer_prune": {"method": "block_influence", "dropped": list(self.dropped),
                                "compensation": self.scales, "influence": list(self.influence)}}


class _BlockProbe:
    """Forward hooks on every block: Σ(1 − cos(h_in, h_out)) and Σ|h| per channel in and out."""

    def __init__(self, n_blocks: int) -> None:
        self.bi = [0.0] * n_blocks
        self.abs_in: list[torch.Tensor | None] = [None] * n_blocks
        self.abs_out: list[torch.Tensor | None] = [None] * n_blocks

    def hook(self, index: int):
        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            h_in, h_out = h_in.detach().float(), h_out.detach().float()
            cos = F.cosine_similarity(h_in, h_out, dim=-1).nan_to_num(nan=0.5)
            self.bi[index] += float((1 - cos).sum())
            for sums, h in ((self.abs_in, h_in), (self.abs_out, h_out)):
                a = h.abs().reshape(-1, h.shape[-1]).sum(0)
                sums[index] = a if sums[index] is None else sums[index] + a

        return forward_hook

    def alpha(self, index: int) -> float:
        """``mean_c E|h_out,c| / E|h_in,c|`` (token counts cancel)."""
        ratio = self.abs_out[index] / self.abs_in[index].clamp_min(torch.finfo(torch.float32).tiny)
        return float(ratio.mean())


@torch.inference_mode()
def block_statistics(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> tuple[list[float], list[float]]:
    """One forward pass: Block Influence and Prune&Comp α of every current block.

    Args:
        model: A decoder-only causal LM.
        windows: Token ids, shape (n, seq_len).
        batch_size: Windows per forward call.

    Returns:
        (BI per block, α per block), in block order. The α of block i is the magnitude ratio of the
        stream after block i (= the input of block i+1) to the stream before it.
    """
    _, blocks = find_blocks(model)
    probe = _BlockProbe(len(blocks))
    handles = [block.register_forward_hook(probe.hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    trunk = decoder_trunk(model)
    try:
        for batch in windows.split(batch_size):
            trunk(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return probe.bi, [probe.alpha(i) for i in range(len(blocks))]


def block_influence(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Block FQN → ``BI = Σ_tokens (1 − cos(h_in, h_out))`` (ShortGPT; Prune&Comp ``CosSim_BI.py``)."""
    path, _ = find_blocks(model)
    bi, _ = block_statistics(model, windows, batch_size)
    return {f"{path}.{i}": value for i, value in enumerate(bi)}


def untie_output_embeddings_(model: nn.Module) -> None:
    """Give the LM head its own weight when it shares the input embedding's (scaling must not reach it)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    config = getattr(model, "config", None)
    for config in (config, getattr(config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def _stream_writers(model: nn.Module, block_index: int) -> list[nn.Module]:
    """Modules writing into the residual stream before block ``block_index``.

    Token embeddings, learned position embeddings (OPT ``embed_positions``) and the output
    projections (:data:`~sparsealloc.pruning.metrics.OUTPUT_PROJECTIONS`) of blocks ``< block_index``.
    """
    _, blocks = find_blocks(model)
    writers = [model.get_input_embeddings()]
    writers += [m for n, m in model.named_modules() if n.endswith("embed_positions") and hasattr(m, "weight")]
    for block in list(blocks)[:block_index]:
        writers += [m for n, m in block.named_modules()
                    if isinstance(m, nn.Linear) and is_output_projection(n)]
    return writers


@torch.no_grad()
def scale_stream_(model: nn.Module, block_index: int, alpha: float) -> None:
    """Multiply the residual stream entering block ``block_index`` by ``alpha`` (Prune&Comp fusion)."""
    untie_output_embeddings_(model)
    for module in _stream_writers(model, block_index):
        module.weight.mul_(alpha)
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(alpha)


def compensate_(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Fuse Prune&Comp scales into ``model`` (which still holds the blocks named in ``scales``).

    For each ``block FQN → α``, the embeddings and the output projections of every block before it
    are multiplied by α. Scales commute, so applying all of them to the original model and then
    dropping the blocks (``prune_`` with ``dropped_layers``) gives the weights of the iterative loop.
    """
    path, blocks = find_blocks(model)
    names = [f"{path}.{i}" for i in range(len(blocks))]
    for fqn, alpha in scales.items():
        if fqn not in names:
            raise SpecError(f"cannot compensate for {fqn!r}: not a decoder block of this model")
        scale_stream_(model, names.index(fqn), float(alpha))


def prune_layers_(
    model: nn.Module,
    windows: torch.Tensor,
    n_blocks: int,
    compensate: bool = True,
    batch_size: int = 4,
) -> LayerPruneResult:
    """Iteratively drop the ``n_blocks`` lowest-BI blocks, fusing Prune&Comp compensation.

    Each step recomputes BI and α on the current model (already pruned and compensated), drops the
    argmin of BI, and scales the stream before it by its α (when ``compensate``).

    Returns:
        The dropped blocks (FQNs of the original model), their α and BI.
    """
    path, blocks = find_blocks(model)
    if not 0 <= n_blocks < len(blocks):
        raise SpecError(f"expected 0 <= blocks to drop < {len(blocks)}, but got {n_blocks}")
    remaining = [f"{path}.{i}" for i in range(len(blocks))]
    result = LayerPruneResult()
    for _ in range(n_blocks):
        bi, alphas = block_statistics(model, windows, batch_size)
        index = min(range(len(bi)), key=bi.__getitem__)
        alpha = alphas[index] if compensate else 1.0
        drop_blocks_(model, [f"{path}.{index}"])
        if compensate:
            scale_stream_(model, index, alpha)
        result.dropped.append(remaining.pop(index))
        result.alphas.append(alpha)
        result.influence.append(bi[index])
    return result


def drop_schedule(
    model: nn.Module,
    windows: torch.Tensor,
    n_blocks: int,
    compensate: bool = True,
    batch_size: int = 4,
) -> LayerPruneResult:
    """The blocks :func:`prune_layers_` would drop, and their α, without changing ``model``.

    Runs the iterative loop on a copy, so the first ``k`` entries of the result are the schedule
    for dropping ``k`` blocks (the loop is greedy: dropping ``k`` then ``k + 1`` extends the same
    list). Apply ``k`` of them with :func:`compensate_` on the first ``k`` scales and an
    :class:`~sparsealloc.core.plan.AllocationPlan` whose ``dropped_layers`` are the first ``k`` FQNs.
    """
    import copy

    return prune_layers_(copy.deepcopy(model), windows, n_blocks, compensate=compensate, batch_size=batch_size)


def first_dropped(schedule: LayerPruneResult, k: int) -> LayerPruneResult:
    """The first ``k`` steps of a :func:`drop_schedule` (as if the loop had stopped there)."""
    return LayerPruneResult(schedule.dropped[:k], schedule.alphas[:k], schedule.influence[:k])


def with_dropped_blocks(plan: AllocationPlan, model: nn.Module, windows: torch.Tensor, n_blocks: int,
                        compensate: bool = True, layout=None, batch_size: int = 4) -> AllocationPlan:
    """``plan`` plus the ``n_blocks`` lowest-BI blocks dropped, at the same overall sparsity.

    The blocks and their Prune&Comp scales come from :func:`drop_schedule` (``model`` is not
    changed); the dropped blocks' weights count toward the plan's parameter-weighted mean
    sparsity and the other Linears' ratios are shifted down to keep it
    (:func:`~sparsealloc.spaces.budget.budget_with_removed`). The scales go into the provenance;
    :func:`compensate_` fuses them before pruning.
    """
    if n_blocks == 0:
        return plan
    layout = layout or model_layout(model)
    ratios = plan.expand(layout.linears)
    target = weighted_mean_sparsity(ratios, layout.numels)
    schedule = drop_schedule(model, windows, n_blocks, compensate, batch_size)
    removed = {n for n in layout.linears if layout.block_of[n] in set(schedule.dropped)}
    sparsity = budget_with_removed(ratios, layout.numels, removed, target, 0.0, 0.99)
    return plan.replace(sparsity=sparsity, dropped_layers=tuple(schedule.dropped),
                        provenance={**plan.provenance, **schedule.provenance()})
