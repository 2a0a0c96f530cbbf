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
from collections.abc import Callable, Hashable, Sequence
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
        Each kind's value over all windows (lower is better).
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
    num = dict.fromkeys(kinds, 0.0)
    den = dict.fromkeys(kinds, 0.0)
    values: dict[str, float] = {}
    layers = model.get_submodule(ctx.layout.blocks_path) if blocks is not None else None
    batches = ctx.reference_batches(windows, "logits" in kinds)
    for done, ((batch, dense_h, kl_terms, logit_sq), ids) in enumerate(zip(batches, ctx.batch_windows(windows)), start=1):
        reuse = (ctx.block_cache.reusing(layers, (ids, id(model), model.dtype), blocks) if layers is not None
                 else nullcontext())
        with reuse:
            h = trunk(input_ids=batch.to(device), use_cache=False).last_hidden_state.float()
        if "logits" in kinds:
            delta = (h - dense_h).reshape(-1, h.shape[-1])  # (tokens, d)
            num["logits"] += float(((delta @ ctx.head_gram) * delta).sum(dtype=torch.float64))
            den["logits"] += logit_sq
            values["logits"] = math.sqrt(max(num["logits"], 0.0) / den["logits"]) if den["logits"] > 0 else math.nan
        if "kl" in kinds:
            m, c = kl_terms
            num["kl"] += kl_sum(h, head.weight, bias, m, c)
            den["kl"] += h.shape[0] * h.shape[1]
            values["kl"] = num["kl"] / den["kl"]
        if "hidden" in kinds:
            num["hidden"] += float((h - dense_h).pow(2).sum(dtype=torch.float64))
            den["hidden"] += float(dense_h.pow(2).sum(dtype=torch.float64))
            values["hidden"] = num["hidden"] / den["hidden"] if den["hidden"] > 0 else math.nan
        if report is not None:
            report(done, values[kinds[0]])
    return values


def reconstruction_error(ctx: EvalContext, kind: str = "logits", report: Reporter | None = None,
                         windows: Sequence[int] | None = None, model: torch.nn.Module | None = None,
                         blocks: Sequence[Hashable] | None = None) -> float:
    """One proxy of :func:`forward_errors` ("logits", "kl" or "hidden")."""
    return forward_errors(ctx, (kind,), report, windows, model, blocks)[kind]
