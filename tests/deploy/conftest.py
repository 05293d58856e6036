"""Fixtures of the deployment tests: rendered kustomize overlays and the tools that check them."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import OVERLAYS, Manifest, render_overlay
from tests.support.procs import require_binary


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_binary("kubectl")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture(scope="session")
def rendered_overlays(kubectl: str) -> dict[str, list[Manifest]]:
    """Every kustomize overlay rendered once: overlay name -> its objects."""
    return {overlay: render_overlay(kubectl, overlay) for overlay in OVERLAYS}
