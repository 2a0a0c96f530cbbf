"""sparsealloc.storage."""
