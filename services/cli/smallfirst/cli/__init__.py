"""smallfirst cli service."""
