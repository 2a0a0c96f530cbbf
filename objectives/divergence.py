"""Exact KL(dense ‖ pruned) of next-token distributions from a d-sized dense reference per token.

The KL proxy (EvoPress, Sieberling et al. 2024, arXiv:2410.14649, scores candidates by the KL of
next-token distributions) needs, per calibration token t, the dense distribution p_t over the whole
vocabulary. Storing it costs tokens × vocab numbers (0.8 GB in fp16 for SmolLM2 at 8k tokens).
Because the pruned logits are ``z = h·Wᵀ + b`` with the *unpruned* LM head (W, b)::

    KL(p ‖ q) = Σ_v p_v log p_v − Σ_v p_v (z_v − lse(z))
              = lse(z) − h·(Σ_v p_v W_v) − p·b + Σ_v p_v log p_v

so two numbers per token are enough: ``m_t = p_tᵀW`` (d floats) and ``c_t = Σ p log p − p·b``.
A trial then needs its own logits only for ``lse(z)``: no vocabulary-sized reference, no
``log_softmax`` + ``kl_div`` pass. The result equals the direct formula up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

#: Tokens per LM-head product: bounds the logits buffer to CHUNK × vocab floats (25 MB for SmolLM2).
CHUNK = 128


def _flat(h: Tensor) -> Tensor:
    return h.reshape(-1, h.shape[-1])


def logsumexp_(z: Tensor) -> Tensor:
    """``logsumexp(z, -1)`` computed in place in ``z`` (which it overwrites): no extra buffer."""
    top = z.amax(-1, keepdim=True)
    z.sub_(top).exp_()
    return z.sum(-1).log_().add_(top.squeeze(-1))


@torch.inference_mode()
def kl_reference(h: Tensor, weight: Tensor, bias: Tensor | None = None, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """The per-token dense reference of :func:`kl_sum`.

    Args:
        h: Dense final hidden states, shape (..., d).
        weight: LM head weight W, shape (vocab, d).
        bias: LM head bias b, shape (vocab,), or None.
        chunk: Tokens per LM-head product.

    Returns:
        ``(m, c)``: ``m = pᵀW`` per token, shape (tokens, d), float32; ``c = Σ p log p − p·b`` per
        token, shape (tokens,), float64.
    """
    flat = _flat(h).to(weight.dtype)
    ms, cs = [], []
    for part in flat.split(chunk):
        logp = F.log_softmax(F.linear(part, weight, bias).float(), dim=-1)
        p = logp.exp()
        ms.append((p @ weight.float()).float())
        c = (p * logp).sum(-1, dtype=torch.float64)
        if bias is not None:
            c -= (p @ bias.float()).double()
        cs.append(c)
    return torch.cat(ms), torch.cat(cs)


@torch.inference_mode()
def kl_sum(h: Tensor, weight: Tensor, bias: Tensor | None, m: Tensor, c: Tensor, chunk: int = CHUNK) -> float:
    """Σ_t KL(p_t ‖ q_t) over the tokens of ``h`` (pruned final hidden states), see module docstring.

    Args:
        h: Pruned final hidden states, shape (..., d), same tokens as the reference.
        weight: LM head weight (unpruned), shape (vocab, d).
        bias: LM head bias or None.
        m: Reference ``pᵀW`` from :func:`kl_reference`, shape (tokens, d).
        c: Reference ``Σ p log p − p·b``, shape (tokens,).
        chunk: Tokens per LM-head product.
    """
    flat = _flat(h).to(weight.dtype)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        lse = logsumexp_(F.linear(part, weight, bias).float())
        dot = (part.float() * m[start : start + chunk]).sum(-1)
        total += (lse.double() - dot.double() + c[start : start + chunk]).sum()
    return float(total)
