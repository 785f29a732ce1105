"""Shared fixtures, kept small and generic.

* Tests marked ``root`` are skipped (with a reason) when not running as root, even if they forget
  their own ``skipif``.
* ``root_only``: a fixture that skips the test unless it runs as root.
* ``home_root``: a root-owned 0755 directory for sliver homes, outside /tmp (pytest's temporary
  directories are 0700 and /tmp is world-writable: sshd's StrictModes and the sliver accounts
  need a path every account can traverse). Always removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root (real accounts, processes, file ownership)"
HOME_PARENT = Path("/var/tmp")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--crash-profile", choices=("short", "long"), default="short",
                     help="crash simulation (tests/crash): short (make test) or long (make crash)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason=ROOT_REASON)
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


@pytest.fixture
def root_only() -> None:
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)


@pytest.fixture
def home_root(root_only: None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nm-test-", dir=HOME_PARENT))
    try:
        os.chown(path, 0, 0)
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """CLI entry points called in-process configure the root logger (level, handlers); give each
    test the logging state it started with, so log assertions do not depend on test order."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def _no_parent_cgroups_left() -> Iterator[None]:
    """The daemon tests run real daemons with enforcement, which make the parent groups
    ``nodemanager`` in every hierarchy (the daemon leaves them: a running node needs them). A
    test session leaves the machine as it found it: groups it made are removed when empty
    (``rmdir`` refuses a group with members or children, so nothing in use is touched)."""
    root = Path("/sys/fs/cgroup")
    existed = set(root.glob("*/nodemanager")) | set(root.glob("nodemanager"))
    yield
    if os.geteuid() != 0:
        return
    for group in set(root.glob("*/nodemanager")) | set(root.glob("nodemanager")):
        if group not in existed:
            try:
                group.rmdir()
            except OSError:
                pass
