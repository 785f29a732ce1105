"""kill -9 of a real daemon mid-sync, then restart: nothing lost, nothing created twice.

The daemon (``nodemanager run``, a separate process) creates real accounts from a ``file://``
slivers.json; the test kills it with SIGKILL at random moments while the document changes between
runs, then lets a final ``sync --once`` converge and checks the machine against the document.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodemanager.store import Store
from nodemanager.testing.accounts import purge_accounts

pytestmark = [pytest.mark.root, pytest.mark.slow]

SRC = Path(__file__).resolve().parents[2] / "src"
PREFIX = "nmk"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKillTestKey{:030d} k@test"


def write_doc(path: Path, names: list[str], timestamp: int) -> None:
    slivers = [{
        "name": name, "slice_id": i + 1, "instantiation": "plc-instantiated",
        "expires": int(time.time()) + 86400,
        "keys": [{"key_type": "ssh", "key": KEY.format(i)}],
        "attributes": [{"tagname": "nm_cpu_share", "value": "2"}],
    } for i, name in enumerate(names)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "slivers": slivers}))
    tmp.replace(path)


def our_accounts() -> dict[str, pwd.struct_passwd]:
    return {p.pw_name: p for p in pwd.getpwall() if p.pw_name.startswith(PREFIX + "site_")}


def cleanup() -> None:
    purge_accounts(PREFIX + "site_")


@pytest.fixture
def node(tmp_path: Path, home_root: Path):  # noqa: ANN201
    cleanup()
    (tmp_path / "node_id").write_text("1\n")
    doc = tmp_path / "slivers.json"
    config = tmp_path / "nm.toml"
    config.write_text(f"""
[node]
data_dir = "{tmp_path / 'data'}"
log_file = "{tmp_path / 'nm.log'}"
[authority]
url = "file://{doc}"
node_id_file = "{tmp_path / 'node_id'}"
poll_interval = 1
poll_jitter = 0
[api]
tcp = ""
unix_socket = ""
[metrics]
listen = ""
[slivers]
home_root = "{home_root}"
name_prefix = "{PREFIX}"
workers = 4
stop_grace = 1
[enforce]
cpu = false
memory = false
bandwidth = false
disk = false
""")
    yield doc, config, tmp_path
    cleanup()


def nodemanager(config: Path, *args: str, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:  # noqa: ANN003
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = [sys.executable, "-m", "nodemanager", "-c", str(config), *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_kill_minus_9_during_syncs_loses_and_duplicates_nothing(node) -> None:  # noqa: ANN001
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
        daemon = nodemanager(config, "run", "--quiet", background=True)
        time.sleep(rng.uniform(0.1, 1.2))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        iterations += 1
    assert iterations >= 5

    result = nodemanager(config, "sync", "--once")
    assert result.returncode == 0, result.stderr[-2000:]
    # A second cycle too: it must find nothing left to do.
    result = nodemanager(config, "sync", "--once")
    assert result.returncode == 0 and "no changes" in result.stdout, result.stdout + result.stderr[-2000:]

    expected = {PREFIX + n for n in current}
    accounts = our_accounts()
    assert set(accounts) == expected
    assert len({p.pw_uid for p in accounts.values()}) == len(accounts)  # no duplicates
    store = Store(tmp_path / "data" / "nodemanager.sqlite")
    try:
        states = store.accounts()
        assert {PREFIX + n for n, s in states.items() if s.owned} == expected
        for name in current:
            account = accounts[PREFIX + name]
            assert states[name].uid == account.pw_uid
            keys = Path(account.pw_dir, ".ssh", "authorized_keys")
            assert keys.stat().st_uid == account.pw_uid
            assert keys.read_text().startswith("ssh-ed25519 ")
    finally:
        store.close()
