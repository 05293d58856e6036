"""smallfirst api service."""
