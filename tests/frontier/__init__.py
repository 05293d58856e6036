"""Frontier tier: the Messages-API simulator, the executor, shared rate limits and pricing."""
