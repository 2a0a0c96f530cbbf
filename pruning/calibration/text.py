"""Calibration and evaluation text: where it comes from, one token stream, seeded windows.

Text sources: a plain text file, several files read as one text (one calibration *domain* each,
:data:`DOMAIN_SEPARATOR` between them), a Hugging Face dataset (``name[:config[:split]]``), or the
offline built-in default (the Python reference manual shipped with CPython as ``pydoc_data``).
Text is tokenized as one stream and ``n`` windows of ``seq_len`` tokens are drawn with a seeded
generator. Memory is bounded by ``n × seq_len`` tokens, never by ``max_position_embeddings``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsealloc.core.errors import SpecError

BUILTIN_SOURCE = "builtin:python-docs"
#: What joins the files of a several-file source (``kind`` "files"): one blank line.
DOMAIN_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSource:
    """Where calibration or evaluation text comes from; :meth:`read` returns the text."""

    kind: str  # "file" | "files" (paths joined by os.pathsep, one domain each) | "dataset" | "builtin"
    location: str = ""
    text_field: str = "text"
    max_chars: int | None = None

    def describe(self) -> str:
        if self.kind == "builtin":
            return f"{BUILTIN_SOURCE}:{self.location or 'all'}"
        return f"{self.kind}:{self.location}"

    @classmethod
    def parse(cls, description: str) -> TextSource:
        """The source :meth:`describe` wrote (``file:PATH``, ``files:PATH{os.pathsep}PATH...``,
        ``dataset:NAME``, ``builtin:python-docs:SPLIT``)."""
        if description.startswith(f"{BUILTIN_SOURCE}:"):
            return cls("builtin", description[len(BUILTIN_SOURCE) + 1:])
        kind, _, location = description.partition(":")
        if kind not in ("file", "files", "dataset") or not location:
            raise SpecError(f"expected a text source 'file:PATH', 'files:PATH{os.pathsep}PATH', 'dataset:NAME' or "
                            f"'{BUILTIN_SOURCE}:SPLIT', but got {description!r}")
        return cls(kind, location, max_chars=5_000_000 if kind == "dataset" else None)

    @classmethod
    def of(cls, text: str | None, dataset: str | None, text_field: str = "text", builtin: str = "calib",
           domains: Sequence[str] = ()) -> TextSource:
        """Calibration text: a file, several files (``domains``, one domain each, read as one text), a
        dataset (its ``text_field`` column), or a built-in split."""
        if domains:
            return cls("files", os.pathsep.join(domains))
        if text:
            return cls("file", text)
        if dataset:
            return cls("dataset", dataset, text_field=text_field, max_chars=5_000_000)
        return cls("builtin", builtin)

    def read(self) -> str:
        if self.kind == "file":
            text = read_text_file(self.location)
        elif self.kind == "files":
            text = DOMAIN_SEPARATOR.join(self.parts())
        elif self.kind == "dataset":
            text = dataset_text(self.location, self.text_field, self.max_chars)
        else:
            text = builtin_text(self.location or "all")
        return text[: self.max_chars] if self.max_chars else text

    def parts(self) -> list[str]:
        """The text of each domain, in order: each file of a ``files`` source; else the whole text."""
        if self.kind == "files":
            return [read_text_file(path) for path in self.location.split(os.pathsep)]
        return [self.read()]


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file; a clear SpecError when it is missing or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SpecError(f"expected a readable text file, but {str(path)!r} gave: {exc.strerror}") from None
    if not text.strip():
        raise SpecError(f"expected a non-empty text file, but {str(path)!r} is empty")
    return text


def builtin_text(split: str = "all") -> str:
    """Offline default text: the Python language reference topics shipped with CPython.

    English technical prose (about 0.5 MB), available without network or extra packages. ``split``
    "calib" takes the even-numbered topics and "eval" the paragraphs of the odd-numbered ones that
    the calibration text does not contain, so the built-in evaluation text is held out from the
    built-in calibration text; "all" takes every topic.
    """
    if split not in ("all", "calib", "eval"):
        raise SpecError(f"built-in text split must be 'all', 'calib' or 'eval', but got {split!r}")
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped interpreters
        raise SpecError(
            "the built-in calibration text (pydoc_data) is missing from this Python; "
            "pass --calib-text FILE or --calib-dataset NAME"
        ) from None
    keys = sorted(topics)
    if split == "all":
        return "\n\n".join(topics[key] for key in keys)
    calib = "\n\n".join(topics[key] for key in keys[0::2])
    if split == "calib":
        return calib
    # Topics share whole sections (e.g. "customization" is inside "specialnames"): keep only the
    # paragraphs of the odd-numbered topics that the calibration text does not contain.
    seen = set(calib.split("\n\n"))
    paragraphs = "\n\n".join(topics[key] for key in keys[1::2]).split("\n\n")
    return "\n\n".join(p for p in paragraphs if p not in seen)


def dataset_text(spec: str, text_field: str = "text", max_chars: int | None = None) -> str:
    """Join the ``text_field`` column of a Hugging Face dataset ``name[:config[:split]]``.

    Uses ``datasets.load_dataset`` (local paths and the offline cache work without network).
    """
    try:
        import datasets
    except ImportError:
        raise SpecError("--calib-dataset needs the datasets package: pip install 'sparsealloc[datasets]'") from None
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise SpecError(f"expected a dataset as NAME[:CONFIG[:SPLIT]], but got {spec!r}")
    name, config, split = (parts + [None, None])[:3]
    try:
        data = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many unrelated types for a bad name
        raise SpecError(f"could not load dataset {spec!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if text_field not in data.column_names:
        raise SpecError(f"expected a text column {text_field!r} in {spec!r}, but it has {data.column_names}")
    pieces, total = [], 0
    for row in data:
        piece = row[text_field] or ""
        pieces.append(piece)
        total += len(piece)
        if max_chars and total >= max_chars:
            break
    return "\n\n".join(pieces)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenize ``text`` as one stream, shape (tokens,)."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def sample_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Draw ``n`` windows of ``seq_len`` consecutive tokens at seeded random offsets.

    Returns:
        Token ids, shape (n, seq_len).
    """
    if n < 1 or seq_len < 2:
        raise SpecError(f"expected at least 1 window of at least 2 tokens, but got {n} × {seq_len}")
    if stream.numel() <= seq_len:
        raise SpecError(f"calibration text has {stream.numel()} tokens; need more than seq_len={seq_len}")
    return windows_at(stream, window_starts(stream.numel(), n, seq_len, seed), seq_len)


def windows_at(stream: torch.Tensor, starts: Sequence[int], seq_len: int) -> torch.Tensor:
    """The windows of ``seq_len`` tokens of ``stream`` that begin at ``starts``, shape (len(starts), seq_len)."""
    return torch.stack([stream[s : s + seq_len] for s in starts])


def window_starts(n_tokens: int, n: int, seq_len: int, seed: int = 0) -> list[int]:
    """The offsets :func:`sample_windows` draws its windows at (seeded, uniform, overlaps allowed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n,), generator=gen).tolist()


def disjoint_starts(n_tokens: int, n: int, seq_len: int, taken: Sequence[int], seed: int = 0) -> list[int]:
    """Offsets of ``n`` windows of ``seq_len`` tokens that share no token with the windows starting at
    ``taken`` (each ``seq_len`` long) nor with each other: held-out windows of the same text.

    The stream is cut into aligned chunks of ``seq_len``; the chunks that overlap a taken window are
    left out and ``n`` of the rest are drawn with a permutation seeded by ``seed``.

    Raises:
        SpecError: when the text has fewer than ``n`` such chunks.
    """
    chunks = n_tokens // seq_len
    blocked = {c for s in taken for c in range(s // seq_len, (s + seq_len - 1) // seq_len + 1)}
    free = [c for c in range(chunks) if c not in blocked]
    if n > len(free):
        raise SpecError(f"expected a calibration text with {n} windows of {seq_len} tokens besides the "
                        f"{len(taken)} statistics windows, but it has room for {len(free)}")
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))[:n]
    return [free[i] * seq_len for i in order.tolist()]


def disjoint_windows(stream: torch.Tensor, n: int, seq_len: int, taken: Sequence[int], seed: int = 0) -> torch.Tensor:
    """The windows at :func:`disjoint_starts`' offsets, shape (n, seq_len)."""
    return windows_at(stream, disjoint_starts(stream.numel(), n, seq_len, taken, seed), seq_len)


def domain_starts(tokenizer, parts: Sequence[str]) -> list[int]:
    """Where each part of a several-part text begins in its token stream (the parts joined by
    :data:`DOMAIN_SEPARATOR`, as :meth:`TextSource.read` joins them): ``[0, len(tokens(part 1 + sep)),
    ...]``, from the token count of each prefix. A merge across the joint can move a boundary by a
    token or two, which :func:`window_domains` does not notice."""
    starts, prefix = [0], ""
    for part in parts[:-1]:
        prefix += part + DOMAIN_SEPARATOR
        starts.append(int(tokenize_stream(tokenizer, prefix).numel()))
    return starts


def window_domains(offsets: Sequence[int], seq_len: int, starts: Sequence[int]) -> tuple[int, ...]:
    """The domain of each window: the part (of :func:`domain_starts`' ``starts``) that holds its middle
    token, so a window that straddles a joint goes to the part with most of its tokens."""
    return tuple(max(i for i, start in enumerate(starts) if start <= offset + seq_len // 2) for offset in offsets)


def calibration_windows(tokenizer, source: TextSource, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Read ``source``, tokenize it, and draw ``n × seq_len`` seeded windows."""
    return sample_windows(tokenize_stream(tokenizer, source.read()), n, seq_len, seed)
