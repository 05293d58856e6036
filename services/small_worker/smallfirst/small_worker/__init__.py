"""smallfirst small_worker service."""
