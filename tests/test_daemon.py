"""The daemon as a process: prompt sync on request, one daemon per data dir, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.store import Store
from nodemanager.testing.accounts import wait_for
from nodemanager.testing.daemonproc import (
    run_nodemanager,
    start_nodemanager,
    write_daemon_config,
    write_slivers_document,
)


def document(path: Path, names: list[str], timestamp: int) -> None:
    write_slivers_document(path, names, timestamp)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_nodemanager(config, *args, timeout=60)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    doc = tmp_path / "slivers.json"
    document(doc, ["site_alpha"], 1000)
    config = write_daemon_config(tmp_path, doc, poll_interval=3600, enforce=None, slivers={"backend": "hollow"})
    process = start_nodemanager(config, "run", "--quiet", discard_output=False)
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
