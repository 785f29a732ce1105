"""kill -9 of a real daemon mid-sync, then restart: nothing lost, nothing created twice.

The daemon (``nodemanager run``, a separate process) creates real accounts from a ``file://``
slivers.json; the test kills it with SIGKILL at random moments while the document changes between
runs, then lets a final ``sync --once`` converge and checks the machine against the document.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.store import Store
from nodemanager.testing.accounts import account_entries, purge_accounts, removed_group, uid_base_for_tests
from nodemanager.testing.daemonproc import (
    run_nodemanager,
    start_nodemanager,
    write_daemon_config,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "nmk"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKillTestKey{:030d} k@test"


def write_doc(path: Path, names: list[str], timestamp: int) -> None:
    """The document for ``names``; a slice keeps its id (its uid derives from it) in every version."""
    slivers = [{"name": name, "slice_id": 1 + int(name.removeprefix("site_s")), "instantiation": "plc-instantiated",
                "expires": int(time.time()) + 86400, "keys": [{"key_type": "ssh", "key": KEY.format(i)}],
                "attributes": [{"tagname": "nm_cpu_share", "value": "2"}]} for i, name in enumerate(names)]
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "slivers": slivers}))
    temp.replace(path)


@pytest.fixture
def node(tmp_path: Path, home_root: Path) -> Iterator[tuple[Path, Path, Path]]:
    purge_accounts(PREFIX + "site_")
    doc = tmp_path / "slivers.json"
    config = write_daemon_config(tmp_path, doc, slivers={
        "home_root": str(home_root), "name_prefix": PREFIX, "workers": 4, "stop_grace": 1,
        "uid_base": uid_base_for_tests(), "keys_dir": str(tmp_path / "keys"), "group": PREFIX + "slivers"})
    with removed_group(PREFIX + "slivers"):
        yield doc, config, tmp_path
        purge_accounts(PREFIX + "site_")


def test_kill_minus_9_during_syncs_loses_and_duplicates_nothing(node: tuple[Path, Path, Path]) -> None:
    doc, config, tmp_path = node
    rng = random.Random(20261125)
    universe = [f"site_s{i}" for i in range(40)]
    current = universe[:24]
    timestamp = 1000
    deadline = time.monotonic() + 60
    iterations = 0
    while iterations < 8 and time.monotonic() < deadline:
        # Change a few slivers each time (well under the safety valve's fraction).
        removed = set(rng.sample(current, 3))
        added = [n for n in universe if n not in current][:3]
        current = [n for n in current if n not in removed] + added
        timestamp += 10
        write_doc(doc, current, timestamp)
        daemon = start_nodemanager(config, "run", "--quiet")
        time.sleep(rng.uniform(0.1, 1.2))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        iterations += 1
    assert iterations >= 5

    result = run_nodemanager(config, "sync", "--once")
    assert result.returncode == 0, result.stderr[-2000:]
    # A second cycle too: it must find nothing left to do.
    result = run_nodemanager(config, "sync", "--once")
    assert result.returncode == 0 and "no changes" in result.stdout, result.stdout + result.stderr[-2000:]

    expected = {PREFIX + n for n in current}
    accounts = account_entries(PREFIX + "site_")
    assert set(accounts) == expected
    assert len({p.uid for p in accounts.values()}) == len(accounts)  # no duplicates
    store = Store(tmp_path / "data" / "nodemanager.sqlite")
    try:
        states = store.accounts()
        assert {PREFIX + n for n, s in states.items() if s.owned} == expected
        for name in current:
            account = accounts[PREFIX + name]
            assert states[name].uid == account.uid
            keys = tmp_path / "keys" / (PREFIX + name)
            assert keys.stat().st_uid == 0
            assert keys.read_text().startswith("ssh-ed25519 ")
    finally:
        store.close()
