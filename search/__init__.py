"""sparsealloc.search."""
