"""sparsealloc.objectives."""
