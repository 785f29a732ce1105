"""The crash simulation's profile: ``--crash-profile`` (declared in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def crash_profile(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--crash-profile"))
