"""Progress reporting shared by every long-running step: bars with ETA, plain lines, quiet, or JSON.

The CLI sets the mode once (``--quiet``, ``--log-format json``; "plain" when stderr is not a
terminal: a log file gets a line when a step starts and one when it ends, never cursor codes);
library code only calls :func:`track`, :func:`say` and :func:`log_event`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Mode = Literal["bar", "plain", "quiet", "json"]
_MODE: Mode = "bar"
_DEPTH = [0]  # steps in progress: "plain" mode prints the outermost only


def set_mode(mode: Mode) -> None:
    """Choose how progress is shown: "bar" (tqdm on stderr), "plain" (a line per step on stderr),
    "quiet" or "json" (JSON lines on stderr)."""
    global _MODE
    if mode not in ("bar", "plain", "quiet", "json"):
        raise ValueError(f"progress mode must be 'bar', 'plain', 'quiet' or 'json', but got {mode!r}")
    _MODE = mode


def get_mode() -> Mode:
    """The current progress mode."""
    return _MODE


def log_event(event: str, **fields: Any) -> None:
    """Emit one structured event (JSON mode only; silent otherwise)."""
    if _MODE == "json":
        record = {"time": round(time.time(), 3), "event": event, **fields}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)


def say(line: str) -> None:
    """One progress line on stderr in "plain" mode (silent otherwise)."""
    if _MODE == "plain":
        print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``."""
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar (ETA) in "bar" mode, a start and an end line in "plain" mode,
    start/end events in "json" mode."""
    if _MODE == "bar":
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    start = time.perf_counter()
    count = 0
    outer = _DEPTH[0] == 0
    log_event("start", step=desc, total=total)
    if outer:
        say(f"{desc}: {total} {unit}(s) ..." if total is not None else f"{desc} ...")
    _DEPTH[0] += 1
    try:
        for item in iterable:
            count += 1
            yield item
    finally:
        _DEPTH[0] -= 1
    seconds = time.perf_counter() - start
    log_event("end", step=desc, count=count, seconds=round(seconds, 3))
    if outer:
        say(f"{desc}: done, {count} {unit}(s) in {duration(seconds)}")
