"""One exception hierarchy for the whole package.

User-facing errors (bad spec, bad plan, unknown name, unreachable store) are subclasses of
:class:`SparseAllocError`; the CLI prints them on one line and exits with code 2.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SparseAllocError(Exception):
    """Base class of every error sparsealloc raises on purpose."""


class SpecError(SparseAllocError, ValueError):
    """A study spec, plan, CLI argument or other user input is malformed."""


class UnknownNameError(SpecError):
    """A registry lookup failed; the message lists the valid names."""


class DuplicateNameError(SparseAllocError):
    """Two implementations were registered under one name."""


class IncompatiblePlanError(SpecError):
    """A plan does not fit the model (unknown module name, wrong layer count...)."""


class StorageError(SparseAllocError):
    """The study store cannot be reached or does not hold what was asked for."""


class OutputError(SparseAllocError):
    """An output file or folder cannot be written (a file in the way, read-only, disk full)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command; the message says what was kept and the command that goes on.

    A :class:`KeyboardInterrupt`, so code that catches Ctrl-C still does.
    """


class TrialFailed(SparseAllocError):
    """Raised inside a worker when a trial cannot produce a value; carries a short reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_user_file(path, what: str) -> str:
    """Read a UTF-8 file the user named; a SpecError saying what was expected if it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"expected a readable {what}, but {str(path)!r} gave: {exc}") from None


def check_output_dir(path, flag: str) -> Path:
    """Check, before any work, that ``path`` is a folder or can be created as one, and is writable.

    Args:
        path: The output folder the user named.
        flag: How the user named it (``--out``), for the message.

    Raises:
        OutputError: a file is in the way, or the nearest existing folder is read-only.
    """
    folder = Path(path)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"expected {flag} to name a folder, but {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"expected {flag} to name a writable folder, but {str(existing)!r} is read-only")
    return folder


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an OSError while writing ``what`` (disk full, permission denied...) into a one-line OutputError."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise OutputError(f"expected to write {what}, but the system said: {exc.strerror or exc}{where}") from None
