"""sparsealloc.search.samplers."""
