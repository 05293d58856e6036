"""smallfirst frontier_worker service."""
