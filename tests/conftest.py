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
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.plc.server import AuthorityServer

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


# --- the bundled authority with a small data file (tests/plc, tests/authority) ---------------------
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDvR4rkn4Jw4FN8KitX2uxIcB9cweEN2Muo86cwVggpI bob@example.org"

AUTHORITY_TOML = f"""
[[nodes]]
id = 1
hostname = "node1.example.org"
key = "node-one-key"
bwcap = 50000

[[nodes]]
id = 2
key = "node-two-key"

[[slices]]
name = "site_alpha"
id = 101
nodes = [1]
keys = ["{KEY_A}"]
initscript = "echo hello"
[slices.attributes]
nm_cpu_share = 2
vsys = ["a", "b"]

[[slices]]
name = "site_ctrl"
id = 102
instantiation = "nm-controller"
keys = ["{KEY_B}"]

[[slices]]
name = "site_deleg"
id = 103
instantiation = "delegated"
controller = "site_ctrl"
nodes = [2]
"""


@pytest.fixture
def authority_file(tmp_path: Path) -> Path:
    path = tmp_path / "authority.toml"
    path.write_text(AUTHORITY_TOML)
    return path


@pytest.fixture
def authority(authority_file: Path) -> Iterator[AuthorityServer]:
    server = AuthorityServer(authority_file, "127.0.0.1", 0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (needs the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key
