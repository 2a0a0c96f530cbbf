"""Model-wise reconstruction-error proxies of a pruned model against the dense reference.

* ``logits`` — OptiShear's fitness (Liu et al. 2025, arXiv:2502.10735; soda-lsq/AdaPrune):
  ‖Logits_pruned − Logits_dense‖_F over all calibration windows, positions and vocabulary entries,
  reported relative to ‖Logits_dense‖_F (a constant factor: the ranking is OptiShear's). Computed
  exactly from final hidden states through the LM head's Gram matrix (see
  :mod:`sparsealloc.objectives.context`).
* ``kl`` — mean KL(p_dense ‖ p_pruned) of next-token distributions per token (EvoPress-style).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsealloc.objectives.context import EvalContext, lm_head_of
from sparsealloc.pruning.calibration import decoder_trunk

Reporter = Callable[[int, float], None]


@torch.inference_mode()
def reconstruction_error(ctx: EvalContext, kind: str = "logits", report: Reporter | None = None) -> float:
    """Run the (pruned) model over the calibration windows and compare with the dense reference.

    Args:
        ctx: The worker's context (the model in it is already pruned).
        kind: "logits" (relative Frobenius error of logits) or "kl".
        report: Called as ``report(step, value_so_far)`` after each batch (multi-fidelity).

    Returns:
        The proxy over all windows (lower is better).
    """
    trunk = decoder_trunk(ctx.model)
    head = lm_head_of(ctx.model)
    device = ctx.device
    num = den = 0.0
    tokens = 0
    for step, (batch, dense_h) in enumerate(zip(ctx.windows.split(ctx.batch_size), ctx.dense_hidden)):
        h = trunk(input_ids=batch.to(device), use_cache=False).last_hidden_state.float()
        if kind == "logits":
            delta = (h - dense_h).reshape(-1, h.shape[-1])  # (tokens, d)
            num += float(((delta @ ctx.head_gram) * delta).sum(dtype=torch.float64))
            den += ctx.dense_logit_sq[step]
            value = math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")
        elif kind == "kl":
            if ctx.dense_logprobs:
                logp_dense = ctx.dense_logprobs[step].float()
            else:
                logp_dense = F.log_softmax(head(dense_h), dim=-1)
            logp = F.log_softmax(head(h), dim=-1)
            num += float(F.kl_div(logp, logp_dense, log_target=True, reduction="sum"))
            tokens += h.shape[0] * h.shape[1]
            value = num / tokens
        else:
            raise ValueError(f"kind must be 'logits' or 'kl', but got {kind!r}")
        if report is not None:
            report(step, value)
    return value
