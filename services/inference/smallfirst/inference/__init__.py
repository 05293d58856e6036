"""smallfirst inference service."""
