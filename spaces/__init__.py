"""sparsealloc.spaces."""
