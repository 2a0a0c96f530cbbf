"""Model-wise reconstruction-error proxies of a pruned model against the dense reference.

All of them come from one forward pass of the pruned model over the calibration windows
(:func:`forward_errors`), so several can be measured for the price of one:

* ``logits`` — OptiShear's fitness (Liu et al. 2025, arXiv:2502.10735; soda-lsq/AdaPrune):
  ‖Logits_pruned − Logits_dense‖_F over all calibration windows, positions and vocabulary entries,
  reported relative to ‖Logits_dense‖_F (a constant factor: the ranking is OptiShear's). Computed
  exactly from final hidden states through the LM head's Gram matrix (see
  :mod:`sparsealloc.objectives.context`): no LM-head product per trial.
* ``kl`` — mean KL(p_dense ‖ p_pruned) of next-token distributions per token (EvoPress, Sieberling
  et al. 2024, arXiv:2410.14649), exact from a d-sized reference per token
  (:mod:`sparsealloc.objectives.divergence`): one LM-head product and one log-sum-exp per token.
* ``hidden`` — relative squared error of the final hidden states, ‖h − h_dense‖² / ‖h_dense‖² over
  all calibration tokens (the decoder's output before the LM head).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext

import torch

from sparsealloc.objectives.context import EvalContext, lm_head_of
from sparsealloc.objectives.divergence import kl_sum
from sparsealloc.pruning.calibration.stats import decoder_trunk

#: ``report(batches_done, value_so_far)``; a True return asks the caller's loop to stop (early
#: stopping is decided by the trial evaluator, which raises; the forward loop itself never stops).
Reporter = Callable[[int, float], object]

FORWARD_PROXIES = ("logits", "kl", "hidden")


@torch.inference_mode()
def forward_errors(ctx: EvalContext, kinds: Sequence[str], report: Reporter | None = None,
                   windows: Sequence[int] | None = None, model: torch.nn.Module | None = None,
                   blocks: Sequence[Hashable] | None = None) -> dict[str, float]:
    """Run the (pruned) model once over the calibration windows and score it as ``kinds`` say.

    Args:
        ctx: The worker's context (the model in it is already pruned).
        kinds: Proxies among :data:`FORWARD_PROXIES`; the first one is reported.
        report: Called as ``report(batches_done, value_so_far)`` after each batch, with the first
            kind's value over the batches so far (multi-fidelity: the running estimate).
        windows: Indices of the calibration windows to score on (None: all of them).
        model: The model to run (:meth:`EvalContext.compute_model`; None: ``ctx.model``). Its final
            hidden states are compared in float32 with the float32 dense reference.
        blocks: The compression of each decoder block of ``model`` (one hashable per block, equal
            keys meaning equal weights), when the caller knows it: the forward pass then reads
            back, from :attr:`EvalContext.block_cache`, the outputs of the leading blocks an earlier
            pass computed on the same windows (:mod:`~sparsealloc.objectives.block_cache`). None:
            every block runs.

    Returns:
        Each kind's value over all windows (lower is better). With domain weights
        (:attr:`EvalContext.domain_weights`, ``calibration.domain_weights``) the weighted mean of each
        domain's value over the domains the windows hold; else one value over all their tokens.
    """
    unknown = [k for k in kinds if k not in FORWARD_PROXIES]
    if unknown or not kinds:
        raise ValueError(f"kinds must be among {list(FORWARD_PROXIES)}, but got {list(kinds)!r}")
    if "kl" in kinds:
        ctx.cache_kl_reference()
    model = ctx.model if model is None else model
    trunk = decoder_trunk(model)
    head = lm_head_of(model)
    bias = getattr(head, "bias", None)
    device = ctx.device
    # Sums per calibration domain (calibration.domain_weights; one domain, 0, without weights).
    num: dict[int, dict[str, float]] = {}
    den: dict[int, dict[str, float]] = {}
    weighted = ctx.domain_weights is not None and ctx.window_domains is not None
    values: dict[str, float] = {}
    layers = model.get_submodule(ctx.layout.blocks_path) if blocks is not None else None
    batches = ctx.reference_batches(windows, "logits" in kinds)
    for done, ((batch, dense_h, kl_terms, logit_sq), ids) in enumerate(zip(batches, ctx.batch_windows(windows)), start=1):
        reuse = (ctx.block_cache.reusing(layers, (ids, id(model), model.dtype), blocks) if layers is not None
                 else nullcontext())
        with reuse:
            h = trunk(input_ids=batch.to(device), use_cache=False).last_hidden_state.float()
        rows: dict[int, list[int]] = {}
        for j, window in enumerate(ids):
            rows.setdefault(ctx.window_domains[window] if weighted else 0, []).append(j)
        for domain, picked in rows.items():
            whole = len(picked) == len(ids)  # the batch at once (always, without domain weights)
            part_h, part_dense = (h, dense_h) if whole else (h[picked], dense_h[picked])
            n, d = num.setdefault(domain, dict.fromkeys(kinds, 0.0)), den.setdefault(domain, dict.fromkeys(kinds, 0.0))
            if "logits" in kinds:
                delta = (part_h - part_dense).reshape(-1, h.shape[-1])  # (tokens, d)
                n["logits"] += float(((delta @ ctx.head_gram) * delta).sum(dtype=torch.float64))
                d["logits"] += logit_sq if whole else sum(ctx.window_logit_sq()[ids[j]] for j in picked)
            if "kl" in kinds:
                m, c = kl_terms
                if not whole:
                    tokens = torch.cat([torch.arange(j * h.shape[1], (j + 1) * h.shape[1]) for j in picked])
                    m, c = m[tokens.to(m.device)], c[tokens.to(c.device)]
                n["kl"] += kl_sum(part_h, head.weight, bias, m, c)
                d["kl"] += part_h.shape[0] * part_h.shape[1]
            if "hidden" in kinds:
                n["hidden"] += float((part_h - part_dense).pow(2).sum(dtype=torch.float64))
                d["hidden"] += float(part_dense.pow(2).sum(dtype=torch.float64))
        values = {kind: _combined(kind, num, den, ctx.domain_weights if weighted else None) for kind in kinds}
        if report is not None:
            report(done, values[kinds[0]])
    return values


def _value(kind: str, num: float, den: float) -> float:
    """One proxy from its sums: ``sqrt(num / den)`` for ``logits`` (a relative Frobenius norm), else
    ``num / den``; NaN without a denominator."""
    if den <= 0:
        return math.nan
    return math.sqrt(max(num, 0.0) / den) if kind == "logits" else num / den


def _combined(kind: str, num: Mapping[int, Mapping[str, float]], den: Mapping[int, Mapping[str, float]],
              weights: Sequence[float] | None) -> float:
    """The proxy over the windows so far: from all sums together without domain weights; else the
    weighted mean of each domain's value, over the domains seen (weights renormalised over them)."""
    if weights is None:
        return _value(kind, sum(n[kind] for n in num.values()), sum(d[kind] for d in den.values()))
    total = sum(weights[domain] for domain in num)
    return sum(weights[domain] / total * _value(kind, num[domain][kind], den[domain][kind]) for domain in num)


def reconstruction_error(ctx: EvalContext, kind: str = "logits", report: Reporter | None = None,
                         windows: Sequence[int] | None = None, model: torch.nn.Module | None = None,
                         blocks: Sequence[Hashable] | None = None) -> float:
    """One proxy of :func:`forward_errors` ("logits", "kl" or "hidden")."""
    return forward_errors(ctx, (kind,), report, windows, model, blocks)[kind]
