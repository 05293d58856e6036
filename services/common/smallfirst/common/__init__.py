"""Shared package of smallfirst: the job model, queue names, Redis keys, settings and telemetry.

Every service depends on this package and on nothing from another service.
"""
