"""Shared fixtures. The helpers themselves live in pipeline/testing.py (scripts and benchmarks use
them too); they are re-exported here for the test modules that import them from tests.conftest."""

from __future__ import annotations

import pytest

from pipeline.testing import CONF, TINY, compose_cfg, run_tiny

__all__ = ["CONF", "TINY", "compose_cfg", "run_tiny"]


@pytest.fixture
def tiny_run(tmp_path):
    return lambda overrides=None, name="run": run_tiny(tmp_path, overrides, name)
