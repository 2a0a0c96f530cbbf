"""Dispatchers: where trials run (in process by default; Ray actors in the distributed setup)."""

from sparsealloc.search.dispatch.base import DISPATCHERS, Dispatcher

__all__ = ["DISPATCHERS", "Dispatcher"]
