"""Shared helpers for the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("GATEWAY_STATE_DIR", str(tmp_path_factory.mktemp("state")))


def pytest_configure(config: pytest.Config) -> None:
    Path(".benchmarks").mkdir(exist_ok=True)
