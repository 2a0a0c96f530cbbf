"""Evaluation: perplexity over windows of a token stream, and a per-layer sparsity report."""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from sparsealloc.core.errors import SpecError
from sparsealloc.core.progress import track
from sparsealloc.pruning.model.structure import model_layout


def eval_windows(stream: torch.Tensor, seq_len: int, n_windows: int | None = None,
                 stride: int | None = None) -> list[tuple[int, int]]:
    """(begin, first scored position) of each evaluation window.

    Windows start every ``stride`` tokens (default ``seq_len``: non-overlapping). With overlap, a
    window scores only the tokens that no earlier window scored (the sliding-window protocol).
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise SpecError(f"stride must be in (0, seq_len={seq_len}], but got {stride}")
    if stream.numel() < seq_len:
        raise SpecError(f"evaluation text has {stream.numel()} tokens; need at least seq_len={seq_len}")
    out = []
    begin = 0
    while begin + seq_len <= stream.numel() and (n_windows is None or len(out) < n_windows):
        first_scored = 1 if begin == 0 else seq_len - stride
        out.append((begin, max(first_scored, 1)))
        begin += stride
    return out


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    stream: torch.Tensor,
    seq_len: int = 512,
    n_windows: int | None = 20,
    stride: int | None = None,
    batch_size: int = 1,
) -> float:
    """Perplexity exp(mean NLL) of ``model`` on windows of a token stream.

    With the default stride this is the Wanda/SparseGPT protocol: the first ``n_windows``
    non-overlapping windows of ``seq_len`` tokens, every next-token prediction inside each window.

    Args:
        model: Causal LM.
        stream: Token ids, shape (tokens,).
        seq_len: Window length.
        n_windows: Number of windows (None: all that fit).
        stride: Step between window starts (default ``seq_len``).
        batch_size: Windows per forward call.
    """
    windows = eval_windows(stream, seq_len, n_windows, stride)
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in track(batches, desc="evaluation", total=len(batches), unit="batch"):
        ids = torch.stack([stream[b : b + seq_len] for b, _ in batch]).to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, L, V)
        for row, (_, first) in enumerate(batch):
            pred = logits[row, first - 1 : seq_len - 1]
            target = ids[row, first:seq_len]
            nll_sum += F.cross_entropy(pred, target, reduction="sum").item()
            count += target.numel()
    mean_nll = nll_sum / max(count, 1)
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")


def sparsity_report(model: nn.Module) -> pd.DataFrame:
    """One row per prunable Linear: block, module FQN, weights, zeros, sparsity.

    ``DataFrame.attrs["total_sparsity"]`` is the parameter-weighted sparsity of all of them.
    """
    layout = model_layout(model)
    modules = dict(model.named_modules())
    rows = []
    for name in layout.linears:
        weight = modules[name].weight
        zeros = int((weight == 0).sum().item())
        rows.append({"block": layout.block_of[name], "module": name, "params": weight.numel(),
                     "zeros": zeros, "sparsity": zeros / weight.numel()})
    frame = pd.DataFrame(rows)
    frame.attrs["total_sparsity"] = float(frame.zeros.sum() / frame.params.sum()) if rows else 0.0
    return frame
