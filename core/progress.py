"""Progress reporting shared by every long-running step: bars with ETA, quiet, or JSON lines.

The CLI sets the mode once (``--quiet``, ``--log-format json``); library code only calls
:func:`track` and :func:`log_event`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Mode = Literal["bar", "quiet", "json"]
_MODE: Mode = "bar"


def set_mode(mode: Mode) -> None:
    """Choose how progress is shown: "bar" (tqdm on stderr), "quiet" or "json" (lines on stderr)."""
    global _MODE
    if mode not in ("bar", "quiet", "json"):
        raise ValueError(f"progress mode must be 'bar', 'quiet' or 'json', but got {mode!r}")
    _MODE = mode


def get_mode() -> Mode:
    """The current progress mode."""
    return _MODE


def log_event(event: str, **fields: Any) -> None:
    """Emit one structured event (JSON mode only; silent otherwise)."""
    if _MODE == "json":
        record = {"time": round(time.time(), 3), "event": event, **fields}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar (ETA) in "bar" mode, start/end events in "json" mode."""
    if _MODE == "bar":
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    start = time.perf_counter()
    count = 0
    log_event("start", step=desc, total=total)
    for item in iterable:
        count += 1
        yield item
    log_event("end", step=desc, count=count, seconds=round(time.perf_counter() - start, 3))
