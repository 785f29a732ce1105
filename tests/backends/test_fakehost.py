"""FakeHost overrides the whole Host surface and behaves like the commands it imitates."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

import pytest

from nodemanager.core.errors import BackendError
from nodemanager.host import Host
from nodemanager.testing.fakehost import FakeHost


def test_every_public_host_method_is_overridden() -> None:
    public = {n for n, v in inspect.getmembers(Host, inspect.isfunction) if not n.startswith("_")}
    missing = {n for n in public if getattr(FakeHost, n) is getattr(Host, n)}
    assert public and not missing


def test_useradd_and_userdel_update_the_tables() -> None:
    host = FakeHost()
    host.run(["useradd", "--user-group", "--comment", "c", "--home-dir", "/h/x", "--password", "*", "pl_x"])
    entry = host.getpwnam("pl_x")
    assert entry is not None and entry.gecos == "c" and entry.home == "/h/x"
    assert host.getgrnam("pl_x") is not None
    assert host.run(["useradd", "pl_x"], check=False).returncode == 9
    host.run(["userdel", "pl_x"])
    assert host.getpwnam("pl_x") is None and host.getgrnam("pl_x") is None
    assert host.run(["userdel", "pl_x"], check=False).returncode == 6


def test_fail_next_fails_once_then_recovers() -> None:
    host = FakeHost()
    host.fail_next("useradd", returncode=3, stderr="bad name")
    with pytest.raises(BackendError, match="bad name"):
        host.run(["useradd", "pl_x"])
    host.run(["useradd", "pl_x"])
    assert host.getpwnam("pl_x") is not None
    host.fail_next("atomic_write")
    with pytest.raises(BackendError):
        host.atomic_write(Path("/x"), b"", uid=0, gid=0, mode=0o600)
    assert Path("/x") not in host.files


def test_signals_end_processes_as_configured() -> None:
    host = FakeHost()
    polite, stubborn, immortal = (host.add_process(5) for _ in range(3))
    host.ignore_term.add(stubborn)
    host.immortal.add(immortal)
    for pid in (polite, stubborn, immortal):
        host.kill(pid, signal.SIGTERM)
    assert host.pids_of_uid(5) == [stubborn, immortal]
    for pid in (stubborn, immortal):
        host.kill(pid, signal.SIGKILL)
    assert host.pids_of_uid(5) == [immortal]


def test_sleep_advances_the_manual_clock() -> None:
    host = FakeHost()
    before = host.monotonic()
    host.sleep(2.5)
    assert host.monotonic() == before + 2.5
