"""sparsealloc.search.dispatch."""
