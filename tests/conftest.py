"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", params=["overlap", "sync"])
def scheduling_mode(request):
    """Runs a module's engine tests twice: with overlapped scheduling (the default) and without
    (``KIMI_GRPC_OVERLAP_SCHEDULING=0``), so every workload shows the same tokens both ways.
    Apply with ``pytestmark = pytest.mark.usefixtures("scheduling_mode")``; a module-scoped
    fixture that builds an engine takes it as an argument (so it is rebuilt per mode)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("KIMI_GRPC_OVERLAP_SCHEDULING", "1" if request.param == "overlap" else "0")
    yield request.param
    patch.undo()
