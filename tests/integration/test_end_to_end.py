"""The whole node manager as an operator runs it: bundled authority over real HTTP, real accounts.

Also hostile authority data reaching the real daemon: each is a clear logged error, and neither
the store nor the accounts change.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import tomli_w

from nodemanager.plc.server import AuthorityServer
from nodemanager.cli import main
from nodemanager.config import Config, parse_config
from nodemanager.daemon import AlreadyRunning, Node, build_node
from nodemanager.store import Store
from nodemanager.testing.accounts import purge_accounts, uid_base_for_tests

pytestmark = pytest.mark.root

PREFIX = "nme"
GROUP = PREFIX + "slivers"  # the sliver group of these nodes (removed with the accounts)
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDvR4rkn4Jw4FN8KitX2uxIcB9cweEN2Muo86cwVggpI bob@example.org"


def ours() -> set[str]:
    return {p.pw_name for p in pwd.getpwall() if p.pw_name.startswith(PREFIX)}


def cleanup() -> None:
    purge_accounts(PREFIX)
    subprocess.run(["groupdel", GROUP], capture_output=True, check=False)


AUTHORITY_TOML = """
[[nodes]]
id = 7
key = "node-seven-key"
bwcap = 50000

[[slices]]
name = "site_alpha"
id = 1
keys = ["{a}"]
initscript = "#!/bin/sh\\nid -u > \\"$HOME/started-uid\\"\\n"
[slices.attributes]
nm_cpu_share = 3

[[slices]]
name = "site_beta"
id = 2
keys = ["{a}", "{b}"]

[[slices]]
name = "site_gone"
id = 3
keys = ["{b}"]
{extra}
"""


def write_authority(path: Path, extra: str = "") -> None:
    path.write_text(AUTHORITY_TOML.format(a=KEY_A, b=KEY_B, extra=extra))
    # The authority's document timestamp follows the file's mtime: make each edit newer.
    stamp = time.time() + getattr(write_authority, "bump", 0)
    write_authority.bump = getattr(write_authority, "bump", 0) + 5  # type: ignore[attr-defined]
    os.utime(path, (stamp, stamp))


def node_config(tmp_path: Path, home_root: Path, url: str) -> Config:
    (tmp_path / "node_id").write_text("7\n")
    (tmp_path / "node_key").write_text("node-seven-key\n")
    return parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": str(tmp_path / "nm.log")},
        "authority": {"url": url, "node_id_file": str(tmp_path / "node_id"),
                      "node_key_file": str(tmp_path / "node_key"), "timeout": 5},
        "api": {"tcp": "", "unix_socket": ""},
        "metrics": {"listen": ""},
        "slivers": {"home_root": str(home_root), "name_prefix": PREFIX, "stop_grace": 1,
                    "uid_base": uid_base_for_tests(), "keys_dir": str(tmp_path / "keys"), "group": GROUP},
        # Enforcement has its own tests; these must not shape this machine's uplink.
        "enforce": {"cpu": False, "memory": False, "bandwidth": False, "disk": False},
    })


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[tuple[AuthorityServer, Path]]:
    data = tmp_path / "authority.toml"
    write_authority(data)
    server = AuthorityServer(data, "127.0.0.1", 0)
    server.start()
    yield server, data
    server.stop()


@pytest.fixture
def clean_accounts() -> Iterator[None]:
    cleanup()
    yield
    cleanup()


def test_daemon_against_bundled_authority_over_http(
    tmp_path: Path, home_root: Path, authority: tuple[AuthorityServer, Path], clean_accounts: None
) -> None:
    server, data = authority
    config = node_config(tmp_path, home_root, f"http://127.0.0.1:{server.port}/PLCAPI/")
    manager = build_node(config)
    manager.start(serve=False)
    try:
        outcome = manager.sync_once()
        assert outcome.ok, outcome.summary()
        assert ours() == {PREFIX + "site_alpha", PREFIX + "site_beta", PREFIX + "site_gone"}
        alpha = pwd.getpwnam(PREFIX + "site_alpha")
        keys = Path(config.slivers.keys_dir, PREFIX + "site_alpha")
        assert keys.read_text() == KEY_A + "\n"
        assert (keys.stat().st_mode & 0o777, keys.stat().st_uid) == (0o644, 0)
        assert Path(alpha.pw_dir).stat().st_mode & 0o777 == 0o700
        assert manager.store.get_meta("bwcap_kbps") == "50000"
        started = Path(alpha.pw_dir, "started-uid")
        # Start is detached: wait for the initscript's output, not just its file (the shell's
        # redirection creates the file before `id` writes to it).
        for _ in range(100):
            if started.exists() and started.read_text().strip():
                break
            time.sleep(0.05)
        assert started.read_text().strip() == str(alpha.pw_uid)

        # The authority drops a slice: the next poll removes exactly that account.
        text = data.read_text().split("[[slices]]\nname = \"site_gone\"")[0]
        data.write_text(text)
        stamp = time.time() + 60
        os.utime(data, (stamp, stamp))
        outcome = manager.sync_once()
        assert outcome.ok and outcome.deletes == 1, outcome.summary()
        assert ours() == {PREFIX + "site_alpha", PREFIX + "site_beta"}

        # A second daemon on the same data directory is refused.
        with pytest.raises(AlreadyRunning):
            build_node(config).start()
    finally:
        manager.close()


def test_wrong_node_key_changes_nothing(
    tmp_path: Path, home_root: Path, authority: tuple[AuthorityServer, Path], clean_accounts: None
) -> None:
    server, _ = authority
    config = node_config(tmp_path, home_root, f"http://127.0.0.1:{server.port}/PLCAPI/")
    Path(config.authority.node_key_file).write_text("not-the-key\n")
    manager = build_node(config)
    manager.start(serve=False)
    try:
        outcome = manager.sync_once()
        assert not outcome.ok
        assert manager.store.slivers() == {} and ours() == set()
    finally:
        manager.close()


def _sliver(name: object, **overrides: object) -> dict:
    entry = {"name": name, "slice_id": zlib.crc32(str(name).encode()) % 10**6, "instantiation": "plc-instantiated",
             "expires": int(time.time()) + 86400, "keys": [{"key_type": "ssh", "key": KEY_A}],
             "attributes": [{"tagname": "nm_cpu_share", "value": "2"}]}
    entry.update(overrides)
    return entry


HOSTILE_DOCUMENTS = {
    "not json": b"{this is not json",
    "truncated": b'{"timestamp": 5000, "node_id": 7, "slivers": [{"name": "site_alpha"',
    "wrong node": json.dumps({"timestamp": 5000, "node_id": 99, "slivers": []}).encode(),
    "no timestamp": json.dumps({"node_id": 7, "slivers": []}).encode(),
    "slivers not a list": json.dumps({"timestamp": 5000, "node_id": 7, "slivers": "x"}).encode(),
    "oversized": b'{"timestamp": 5000, "node_id": 7, "slivers": [], "pad": "' + b"x" * (70 << 20) + b'"}',
}


def test_hostile_documents_change_nothing(
    tmp_path: Path, home_root: Path, clean_accounts: None, caplog: pytest.LogCaptureFixture
) -> None:
    doc = tmp_path / "slivers.json"
    doc.write_text(json.dumps({"timestamp": 1000, "node_id": 7,
                               "slivers": [_sliver("site_alpha"), _sliver("site_beta")]}))
    config = node_config(tmp_path, home_root, f"file://{doc}")
    manager = build_node(config)
    manager.start(serve=False)
    try:
        assert manager.sync_once().ok
        before_records = manager.store.slivers()
        before_accounts = {n: s.uid for n, s in manager.store.accounts().items()}
        before_users = ours()
        assert before_users == {PREFIX + "site_alpha", PREFIX + "site_beta"}
        for label, body in HOSTILE_DOCUMENTS.items():
            doc.write_bytes(body)
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                outcome = manager.sync_once()
            assert not outcome.ok, label
            assert any("authority" in r.getMessage() for r in caplog.records), label
            assert manager.store.slivers() == before_records, label
            assert {n: s.uid for n, s in manager.store.accounts().items()} == before_accounts, label
            assert ours() == before_users, label
    finally:
        manager.close()


BAD_NAMES = ["../x", "root", "a;b", "x" * 200, "Site_Upper", "site.dots", "", 42, None]


def test_invalid_entries_are_dropped_and_the_rest_proceeds(
    tmp_path: Path, home_root: Path, clean_accounts: None, caplog: pytest.LogCaptureFixture
) -> None:
    doc = tmp_path / "slivers.json"
    doc.write_text(json.dumps({"timestamp": 1000, "node_id": 7, "slivers": [_sliver("site_alpha")]}))
    config = node_config(tmp_path, home_root, f"file://{doc}")
    manager = build_node(config)
    manager.start(serve=False)
    try:
        assert manager.sync_once().ok
        bad = [_sliver(name) for name in BAD_NAMES]
        bad += [_sliver("site_types", slice_id="seven"), _sliver("site_keys", keys="not-a-list"),
                _sliver("site_inst", instantiation="vserver"),
                _sliver("site_alpha", expires="tomorrow")]  # a bad new entry for an existing sliver
        doc.write_text(json.dumps({"timestamp": 2000, "node_id": 7, "slivers": [*bad, _sliver("site_new")]}))
        with caplog.at_level(logging.ERROR):
            outcome = manager.sync_once()
        assert outcome.ok and outcome.rejected == len(bad)
        rejected_lines = [r.getMessage() for r in caplog.records if "entry-rejected" in r.getMessage()]
        assert len(rejected_lines) == len(bad)
        # the valid entry proceeds; the invalid one never deletes the existing sliver of its name
        assert ours() == {PREFIX + "site_alpha", PREFIX + "site_new"}
        assert set(manager.store.slivers()) == {"site_alpha", "site_new"}
        assert sorted(p.name for p in home_root.iterdir()) == sorted(ours())  # no stray homes
    finally:
        manager.close()


def test_cli_sync_plan_and_status(
    tmp_path: Path, home_root: Path, clean_accounts: None, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "slivers.json"
    doc.write_text(json.dumps({"timestamp": 1000, "node_id": 7,
                               "slivers": [_sliver("site_alpha"), _sliver("site_beta")]}))
    config = node_config(tmp_path, home_root, f"file://{doc}")
    path = tmp_path / "nm.toml"
    path.write_text(tomli_w.dumps(msgspec.to_builtins(config)))
    assert main(["-c", str(path), "sync", "--once"]) == 0
    capsys.readouterr()
    doc.write_text(json.dumps({"timestamp": 2000, "node_id": 7,
                               "slivers": [_sliver("site_alpha"), _sliver("site_gamma")]}))
    assert main(["-c", str(path), "plan"]) == 0
    plan = capsys.readouterr().out
    assert "destroy   site_beta" in plan and "create    site_gamma" in plan
    assert "timestamp 2000, 2 slivers, 0 rejected" in plan
    assert ours() == {PREFIX + "site_alpha", PREFIX + "site_beta"}  # plan changed nothing
    assert main(["-c", str(path), "status"]) == 0
    status = capsys.readouterr().out
    uid = str(pwd.getpwnam(PREFIX + "site_alpha").pw_uid)
    assert "site_alpha" in status and uid in status and "running" in status
    assert "backend:        account" in status
    assert "NOT ENFORCED:   cpu: not enforced ([enforce] cpu = false)" in status
    # `sync` without --once and no daemon running: a clear error
    assert main(["-c", str(path), "sync"]) == 1
    assert "no node manager daemon is running" in capsys.readouterr().err
    with Store(config.data_dir / "nodemanager.sqlite") as store:
        assert set(store.slivers()) == {"site_alpha", "site_beta"}
