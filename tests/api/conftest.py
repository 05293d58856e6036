"""The API fixtures live in tests/api_fixtures.py, registered as a plugin by tests/conftest.py."""
