"""Fixtures shared by the test modules that need real parts."""

from __future__ import annotations

import pytest

from core.names import FEATURE_CACHE_ENV, WARM_DIR_ENV


@pytest.fixture(autouse=True)
def _own_feature_cache(tmp_path, monkeypatch):
    """Each test starts with no feature cache: a sweep run earlier in the session builds one
    for the tiny config, which a later test reading frames must not pick up by accident.
    Tests that share a cache on purpose set ``feature_cache.dir``."""
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(tmp_path / "feature-cache"))
    # and no warm server: a `slotsweep up` of the person running the tests is not theirs
    monkeypatch.setenv(WARM_DIR_ENV, str(tmp_path / "warm"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow server on loopback (SQLite store in a temporary folder), one per module."""
    from orchestrator.mlflow_server import LocalServer

    with LocalServer.start(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv
