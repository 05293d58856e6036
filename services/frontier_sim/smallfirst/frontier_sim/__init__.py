"""smallfirst frontier_sim service."""
