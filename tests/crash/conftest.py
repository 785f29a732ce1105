"""``--crash-profile``: ``short`` (``make test``: every crash point of small scenarios) or
``long`` (``make crash``: larger scenarios, several seeds: thousands of crash points)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--crash-profile", choices=("short", "long"), default="short",
                     help="crash simulation size: short (make test) or long (make crash)")


@pytest.fixture(scope="session")
def crash_profile(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--crash-profile"))
