"""One exception hierarchy for the whole package.

User-facing errors (bad spec, bad plan, unknown name, unreachable store) are subclasses of
:class:`SparseAllocError`; the CLI prints them on one line and exits with code 2.
"""

from __future__ import annotations


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


class TrialFailed(SparseAllocError):
    """Raised inside a worker when a trial cannot produce a value; carries a short reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_user_file(path, what: str) -> str:
    """Read a UTF-8 file the user named; a SpecError saying what was expected if it cannot be read."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"expected a readable {what}, but {str(path)!r} gave: {exc}") from None
