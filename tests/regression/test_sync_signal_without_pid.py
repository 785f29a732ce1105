"""``nodemanager sync`` never signals a pid it does not know.

``sync`` (without ``--once``) asks the daemon holding the data directory's lock to poll now by
sending it SIGUSR1. ``DataDir.daemon_pid`` answers -1 when a process holds the lock but the pid
file names no process -- the daemon between taking the lock and writing its pid, or a pid file
that was emptied. ``sync`` passed that -1 to ``kill``, and ``kill(-1, SIGUSR1)`` as root sends
SIGUSR1 (whose default action ends a process) to every process on the machine. Now it says so and
exits 1 without signalling anything.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from nodemanager.cli import main
from nodemanager.config import parse_config, to_toml


def test_a_held_lock_without_a_pid_is_not_signalled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = parse_config({"node": {"data_dir": str(data), "log_file": ""}, "slivers": {"backend": "hollow"}})
    path = tmp_path / "nm.toml"
    path.write_text(to_toml(config))
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))
    fd = os.open(data / "nodemanager.pid", os.O_RDWR | os.O_CREAT, 0o644)  # a daemon's lock, no pid yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(["-c", str(path), "sync"]) == 1
    finally:
        os.close(fd)
    assert signalled == []
    assert "names no process" in capsys.readouterr().err
