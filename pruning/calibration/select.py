"""Select a calibration set from a larger candidate pool, and read/write it as JSON lines.

Lifecycle around :mod:`sparsealloc.pruning.calibration.data_selection` (the math): draw a seeded pool of
non-overlapping candidate windows from the calibration text, run the dense model over them once to
get each window's mean-pooled hidden state at one block (the self-supervised embedding of
Sorscher et al. 2022) and its mean next-token loss, score them with a selection metric, keep
``n`` of them, and write the set with its provenance.

File format (``calib.jsonl``), one JSON object per line:

- line 1, the header: ``{"format": "sparsealloc.calibration-set", "version": 1, "model", "tokenizer",
  "vocab_size", "seq_len", "n", "metric", "keep", "balanced", "k", "layer", "pool", "seed", "source"}``;
- then one line per window: ``{"index", "offset", "score", "cluster", "input_ids", "text"}``
  (``offset``: first token in the tokenized source; ``cluster``: null unless the metric clusters).

The same inputs and seed give a byte-identical file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsealloc.core.errors import SpecError, read_user_file
from sparsealloc.core.progress import log_event, track
from sparsealloc.pruning.calibration.data_selection import METRIC_NEEDS, SELECTION_METRICS, WindowFeatures, score_windows, select
from sparsealloc.pruning.calibration.stats import decoder_trunk
from sparsealloc.pruning.model.structure import model_layout

FORMAT = "sparsealloc.calibration-set"
VERSION = 1
HEADER_KEYS = ("format", "version", "model", "tokenizer", "vocab_size", "seq_len", "n", "metric", "keep",
               "balanced", "k", "layer", "pool", "seed", "source")


@dataclass(frozen=True)
class CalibrationSet:
    """Selected calibration windows (n, seq_len) with one record per window and the file header.

    Usable wherever a calibration source is: :meth:`describe` names it, :meth:`read` returns
    the windows' text.
    """

    windows: Tensor
    header: dict[str, Any]
    records: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    path: str | None = None

    def describe(self) -> str:
        return f"windows:{self.path}" if self.path else f"windows:{self.header.get('metric')}"

    def read(self) -> str:
        return "\n\n".join(str(r.get("text", "")) for r in self.records)

    @property
    def clusters(self) -> tuple[int, ...] | None:
        """Each window's cluster when every window has one (``calib mix``, ``calib select --metric
        ssp``), else None."""
        labels = [r.get("cluster") for r in self.records]
        whole = bool(labels) and all(isinstance(c, int) and not isinstance(c, bool) for c in labels)
        return tuple(labels) if whole else None

    def check_tokenizer(self, tokenizer) -> None:
        """Fail unless ``tokenizer`` has the vocabulary size the windows were tokenized with."""
        size = len(tokenizer)
        if int(self.header["vocab_size"]) != size:
            raise SpecError(
                f"expected calibration windows tokenized with this model's tokenizer ({size} tokens), but "
                f"{self.path or 'the set'} was made with {self.header.get('tokenizer')!r} "
                f"({self.header['vocab_size']} tokens)")

    def provenance(self) -> dict[str, Any]:
        """What a plan records about this calibration (source, size and how it was selected)."""
        keys = ("metric", "keep", "balanced", "k", "layer", "pool", "seed", "source")
        return {"source": self.describe(), "samples": int(self.windows.shape[0]),
                "seq_len": int(self.windows.shape[1]), "selection": {k: self.header.get(k) for k in keys}}


# --------------------------------------------------------------------------- candidates
def candidate_offsets(n_tokens: int, n: int, seq_len: int, seed: int = 0) -> list[int]:
    """Starts of ``n`` distinct non-overlapping windows, drawn with a seeded permutation.

    The stream is cut into ``n_tokens // seq_len`` aligned chunks; a permutation seeded by
    ``seed`` picks ``n`` of them (so the pool has no near-duplicate windows).
    """
    chunks = n_tokens // seq_len
    if seq_len < 2 or n < 1:
        raise SpecError(f"expected at least 1 candidate window of at least 2 tokens, but got {n} × {seq_len}")
    if n > chunks:
        raise SpecError(f"expected a candidate pool of at most {chunks} windows of {seq_len} tokens "
                        f"(the text has {n_tokens} tokens), but got {n}")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(chunks, generator=generator)[:n]
    return [int(c) * seq_len for c in picks]


def candidate_pool(stream: Tensor, n: int, seq_len: int, seed: int = 0) -> tuple[Tensor, list[int]]:
    """Token ids of the candidate windows (n, seq_len) and their offsets in ``stream``."""
    offsets = candidate_offsets(stream.numel(), n, seq_len, seed)
    return torch.stack([stream[o : o + seq_len] for o in offsets]), offsets


# --------------------------------------------------------------------------- features
def embedding_block(model: nn.Module, layer: int | None) -> str:
    """FQN of the decoder block whose output embeds windows (None: the middle block)."""
    blocks = model_layout(model).blocks
    index = len(blocks) // 2 if layer is None else layer
    if not -len(blocks) <= index < len(blocks):
        raise SpecError(f"expected an embedding layer in [{-len(blocks)}, {len(blocks) - 1}] "
                        f"(the model has {len(blocks)} blocks), but got {layer}")
    return blocks[index]


@torch.inference_mode()
def window_features(model: nn.Module, windows: Tensor, block: str, need: frozenset[str] | set[str],
                    batch_size: int = 4) -> WindowFeatures:
    """One dense pass over ``windows``: embeddings and/or mean next-token losses.

    The embedding is the output of ``block`` mean-pooled over positions 1…L−1: the first position
    is left out because decoder LMs park huge activations there (the attention sink), which would
    make every window look alike.

    Args:
        model: Causal LM.
        windows: Token ids (n, seq_len).
        block: FQN of the block whose output is pooled.
        need: Subset of {"embeddings", "losses"}; an empty set runs nothing.
        batch_size: Windows per forward call.
    """
    count = int(windows.shape[0])
    if not need:
        return WindowFeatures(count)
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(hidden[:, 1:].float().mean(1).cpu())

    handle = dict(model.named_modules())[block].register_forward_hook(hook) if "embeddings" in need else None
    device = next(model.parameters()).device
    losses: list[Tensor] = []
    try:
        batches = windows.split(batch_size)
        for batch in track(batches, desc="window features", total=len(batches), unit="batch"):
            ids = batch.to(device)
            if "losses" in need:
                logits = model(input_ids=ids, use_cache=False).logits.float()
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
                losses.append(nll.mean(1).cpu())
            else:
                decoder_trunk(model)(input_ids=ids, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    return WindowFeatures(count, torch.cat(captured) if captured else None, torch.cat(losses) if losses else None)


# --------------------------------------------------------------------------- selection
def select_calibration_set(model: nn.Module, tokenizer, stream: Tensor, n: int, metric: str = "ssp",
                           keep: str = "hard", balanced: bool = False, seq_len: int = 256,
                           pool: int | None = None, k: int = 8, layer: int | None = None, seed: int = 0,
                           batch_size: int = 4, info: Mapping[str, Any] | None = None) -> CalibrationSet:
    """Draw a candidate pool from ``stream``, score it with ``metric`` and keep ``n`` windows.

    Args:
        model: The dense causal LM (embeddings and losses come from it).
        tokenizer: Its tokenizer (window text and the vocabulary size in the header).
        stream: Tokenized calibration text (tokens,).
        n: Windows to keep.
        metric: A registered selection metric: ssp, loss or random.
        keep: "hard" (highest scores) or "easy" (lowest).
        balanced: Take turns over the k-means clusters (ssp only).
        seq_len: Tokens per window.
        pool: Candidate windows (default 8 × n, at most what the text holds).
        k: Clusters of the ssp metric.
        layer: Block index whose output embeds windows (default: the middle block).
        seed: Seeds the pool, k-means++ and tie-breaking (and the random metric).
        batch_size: Windows per forward call.
        info: Extra header fields (``model``, ``source``).

    Returns:
        The selected :class:`CalibrationSet`, most preferred window first.
    """
    SELECTION_METRICS.get(metric)  # unknown names fail first, listing the valid ones
    if balanced and metric != "ssp":
        raise SpecError(f"expected --balanced with the clustering metric ssp, but got metric {metric!r}")
    pool = pool if pool is not None else min(8 * n, stream.numel() // seq_len)
    if n > pool:
        raise SpecError(f"expected n ≤ the candidate pool ({pool} windows), but got n={n}")
    if metric == "ssp" and not 1 <= k <= pool:
        raise SpecError(f"expected k in [1, {pool}] (the candidate pool), but got {k}")
    candidates, offsets = candidate_pool(stream, pool, seq_len, seed)
    block = embedding_block(model, layer)
    features = window_features(model, candidates, block, METRIC_NEEDS[metric], batch_size)
    scored = score_windows(metric, features, k, seed)
    chosen = select(scored.scores, n, keep, scored.labels, balanced, seed).tolist()
    log_event("calibration_selected", metric=metric, keep=keep, n=n, pool=pool)
    header = _header(tokenizer, seq_len, n, seed, info, metric=metric, keep=keep, balanced=balanced,
                     k=k if metric == "ssp" else None, layer=block, pool=pool)
    records = tuple(_record(tokenizer, rank, candidates[i], offsets[i], round(float(scored.scores[i]), 6),
                            None if scored.labels is None else int(scored.labels[i]))
                    for rank, i in enumerate(chosen))
    return CalibrationSet(candidates[chosen].clone(), header, records)


def mix_calibration_set(tokenizer, streams: Sequence[tuple[str, Tensor]], n: int, seq_len: int = 256,
                        seed: int = 0, info: Mapping[str, Any] | None = None) -> CalibrationSet:
    """``n`` windows drawn in equal shares from several tokenized texts, each window's cluster its text.

    A mixed-domain calibration set (Williams & Aletras, 2024: the calibration data's domain shapes
    what a pruned model keeps). Text ``i`` gives ``n // k`` windows (one more for the first ``n % k``
    texts), non-overlapping and drawn with :func:`candidate_pool`; the clusters let the evo sampler
    draw its stage windows in proportion to the texts (:func:`~sparsealloc.search.samplers.evo.stage_windows`).

    Args:
        tokenizer: The model's tokenizer (window text and the vocabulary size in the header).
        streams: ``(description, token ids)`` per text, in cluster order.
        n: Windows in all (at least one per text).
        seq_len: Tokens per window.
        seed: Seeds each text's draw.
        info: Extra header fields (``model``).

    Raises:
        SpecError: fewer windows than texts, or a text too short for its share.
    """
    if len(streams) < 1 or n < len(streams):
        raise SpecError(f"expected at least one window per text ({len(streams)} texts), but got n={n}")
    windows, records = [], []
    for cluster, (source, stream) in enumerate(streams):
        share = n // len(streams) + (cluster < n % len(streams))
        drawn, offsets = candidate_pool(stream, share, seq_len, seed)
        for window, offset in zip(drawn, offsets):
            windows.append(window)
            records.append(_record(tokenizer, len(records), window, offset, None, cluster))
    log_event("calibration_mixed", texts=len(streams), n=n)
    header = _header(tokenizer, seq_len, n, seed, {"source": " | ".join(s for s, _ in streams), **dict(info or {})},
                     metric="mix", keep=None, balanced=True, k=len(streams), layer=None, pool=None)
    return CalibrationSet(torch.stack(windows), header, tuple(records))


def _header(tokenizer, seq_len: int, n: int, seed: int, info: Mapping[str, Any] | None, **selection: Any) -> dict:
    """The header line of a set: format, tokenizer, sizes, how it was selected, then ``info``."""
    return {"format": FORMAT, "version": VERSION, "model": None, "tokenizer": getattr(tokenizer, "name_or_path", None),
            "vocab_size": len(tokenizer), "seq_len": seq_len, "n": n, **selection, "seed": seed, "source": None,
            **dict(info or {})}


def _record(tokenizer, index: int, window: Tensor, offset: int, score: float | None, cluster: int | None) -> dict:
    """One window's line: its rank, offset in the source, score, cluster, token ids and text."""
    return {"index": index, "offset": offset, "score": score, "cluster": cluster,
            "input_ids": window.tolist(), "text": tokenizer.decode(window)}


# --------------------------------------------------------------------------- file I/O
def write_calibration_set(selected: CalibrationSet, path: str | Path) -> Path:
    """Write the header line and one line per window (UTF-8 JSON lines)."""
    path = Path(path)
    lines = [json.dumps({k: selected.header.get(k) for k in HEADER_KEYS}, ensure_ascii=False)]
    lines += [json.dumps(r, ensure_ascii=False) for r in selected.records]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"expected a writable path for the calibration set, "
                        f"but {str(path)!r} gave: {exc.strerror}") from None
    return path


def read_calibration_set(path: str | Path) -> CalibrationSet:
    """Read and validate a ``calib.jsonl`` written by :func:`write_calibration_set`.

    Args:
        path: The file.

    Raises:
        SpecError: one line naming the file, the line and what was expected, for a missing file,
        broken JSON, a wrong header, windows of unequal length or token ids outside the vocabulary.
    """
    text = read_user_file(path, "calibration set (JSON lines from 'sparsealloc calib select')")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SpecError(f"expected a calibration set with a header line, but {str(path)!r} is empty")
    rows = [_parse_line(path, number, line) for number, line in enumerate(lines, 1)]
    header = _check_header(path, rows[0])
    if len(rows) == 1:
        raise SpecError(f"expected at least one window after the header of {str(path)!r}, but got none")
    records = tuple(_check_window(path, number, row, header) for number, row in enumerate(rows[1:], 2))
    return CalibrationSet(torch.tensor([r["input_ids"] for r in records], dtype=torch.long), header, records,
                          str(path))


def _parse_line(path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SpecError(f"expected a JSON object on line {number} of {str(path)!r}, "
                        f"but parsing failed: {exc.msg}") from None
    if not isinstance(row, dict):
        raise SpecError(f"expected a JSON object on line {number} of {str(path)!r}, but got {type(row).__name__}")
    return row


def _check_header(path, header: dict[str, Any]) -> dict[str, Any]:
    if header.get("format") != FORMAT:
        raise SpecError(f"expected line 1 of {str(path)!r} to be a header with format {FORMAT!r}, "
                        f"but got format {header.get('format')!r}")
    if header.get("version") != VERSION:
        raise SpecError(f"expected calibration-set version {VERSION} in {str(path)!r}, "
                        f"but got {header.get('version')!r}")
    for key in ("vocab_size", "seq_len"):
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise SpecError(f"expected an integer {key} >= 2 in the header of {str(path)!r}, but got {value!r}")
    return header


def _check_window(path, number: int, row: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    ids = row.get("input_ids")
    where = f"line {number} of {str(path)!r}"
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise SpecError(f"expected input_ids as a list of integers on {where}, but got {_short(ids)}")
    if len(ids) != header["seq_len"]:
        raise SpecError(f"expected {header['seq_len']} token ids (the header's seq_len) on {where}, "
                        f"but got {len(ids)}")
    bad = [t for t in ids if not 0 <= t < header["vocab_size"]]
    if bad:
        raise SpecError(f"expected token ids in [0, {header['vocab_size']}) on {where}, but got {bad[0]}")
    return row


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
