"""Fixtures shared by the test modules that need real parts."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow server on loopback (SQLite store in a temporary folder), one per module."""
    from orchestrator import tracking

    with tracking.LocalServer.start(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv
