"""sparsealloc.cli."""
