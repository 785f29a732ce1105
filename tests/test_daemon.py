"""The daemon as a process: prompt sync on request, one daemon per data dir, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.store import Store
from nodemanager.testing.accounts import wait_for

SRC = Path(__file__).resolve().parents[1] / "src"


def document(path: Path, names: list[str], timestamp: int) -> None:
    slivers = [{"name": n, "slice_id": i, "instantiation": "plc-instantiated",
                "expires": int(time.time()) + 86400, "keys": [], "attributes": []}
               for i, n in enumerate(names)]
    path.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "slivers": slivers}))


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nodemanager", "-c", str(config), *args],
                          env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    doc = tmp_path / "slivers.json"
    document(doc, ["site_alpha"], 1000)
    (tmp_path / "node_id").write_text("1\n")
    config = tmp_path / "nm.toml"
    config.write_text(f"""
[node]
data_dir = "{tmp_path / 'data'}"
log_file = "{tmp_path / 'nm.log'}"
[authority]
url = "file://{doc}"
node_id_file = "{tmp_path / 'node_id'}"
poll_interval = 3600
poll_jitter = 0
[api]
tcp = ""
unix_socket = ""
[metrics]
listen = ""
[slivers]
backend = "hollow"
""")
    process = subprocess.Popen([sys.executable, "-m", "nodemanager", "-c", str(config), "run", "--quiet"],
                               env={**os.environ, "PYTHONPATH": str(SRC)})
    yield process, config, doc
    if process.poll() is None:
        process.kill()
        process.wait(10)


def slivers_in_store(tmp_path: Path) -> set[str]:
    path = tmp_path / "data" / "nodemanager.sqlite"
    if not path.exists():
        return set()
    with Store(path) as store:
        return set(store.slivers())


def test_prompt_sync_lock_and_graceful_stop(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    process, config, doc = daemon
    assert wait_for(lambda: slivers_in_store(tmp_path) == {"site_alpha"})

    # A second daemon (or sync --once) on the same data dir is refused while it runs.
    second = cli(config, "sync", "--once")
    assert second.returncode == 1 and "another node manager" in second.stderr

    # `nodemanager sync` asks the running daemon to poll now (the period is an hour).
    document(doc, ["site_alpha", "site_beta"], 2000)
    asked = cli(config, "sync")
    assert asked.returncode == 0 and f"pid {process.pid}" in asked.stdout
    assert wait_for(lambda: slivers_in_store(tmp_path) == {"site_alpha", "site_beta"})

    status = cli(config, "status")
    assert status.returncode == 0 and "HOLLOW" in status.stdout and "site_beta" in status.stdout
    assert "enforcement:    none: the hollow backend creates nothing to enforce" in status.stdout

    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    log = (tmp_path / "nm.log").read_text()
    assert "event=daemon-started" in log and "event=daemon-stopped" in log
    assert "event=hollow-backend" in log
    # the lock went with the process: a one-off cycle now runs
    assert cli(config, "sync", "--once").returncode == 0


def test_sighup_reopens_a_rotated_log(daemon, tmp_path: Path) -> None:  # noqa: ANN001
    process, config, doc = daemon
    log = tmp_path / "nm.log"
    assert wait_for(lambda: log.exists() and "sync-done" in log.read_text())
    log.rename(tmp_path / "nm.log.1")
    process.send_signal(signal.SIGHUP)
    document(doc, ["site_alpha", "site_gamma"], 3000)
    os.kill(process.pid, signal.SIGUSR1)
    assert wait_for(lambda: log.exists() and "sync-done" in log.read_text())
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
