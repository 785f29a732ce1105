"""Fixtures for the bundled authority: a data file and a running server.

Every server binds 127.0.0.1 port 0 and is stopped (its loop thread joined) at teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.plc.server import AuthorityServer

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
