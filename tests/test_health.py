"""``nodemanager health``: exit status and one-line reason for each of the four checks; sd_notify."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager import health
from nodemanager.cli import main
from nodemanager.config import Config, parse_config
from nodemanager.core.errors import AuthorityUnavailable
from nodemanager.daemon import Node, build_node
from nodemanager.health import check_health, sd_notify, sync_deadline
from nodemanager.testing.fakeauthority import FakeAuthority, make_sliver


def make_config(tmp_path: Path, *, unix_socket: str = "", poll: int = 60, jitter: int = 30) -> Config:
    return parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"poll_interval": poll, "poll_jitter": jitter},
        "api": {"tcp": "", "unix_socket": unix_socket},
        "metrics": {"listen": ""},
        "slivers": {"backend": "hollow"},
    })


def write_toml(tmp_path: Path, config: Config) -> Path:
    from nodemanager.config import to_toml

    path = tmp_path / "nm.toml"
    path.write_text(to_toml(config))
    return path


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Node, Config]]:
    """A daemon loop in a thread with the API on a Unix socket, after its first good sync."""
    config = make_config(tmp_path, unix_socket=str(tmp_path / "api.sock"))
    authority = FakeAuthority()
    authority.publish([make_sliver("site_alpha")])
    manager = build_node(config, fetch=authority.fetch)
    synced = threading.Event()
    manager.on_sync.append(lambda outcome: synced.set())
    loop = threading.Thread(target=manager.run, daemon=True)
    loop.start()
    assert synced.wait(10)
    yield manager, config
    manager.stop()
    loop.join(20)
    assert not loop.is_alive()


def test_no_daemon_is_unhealthy(tmp_path: Path) -> None:
    report = check_health(make_config(tmp_path))
    assert not report.ok and report.exit_code == 1
    assert report.line.startswith("unhealthy: no node manager daemon is running")


def test_a_running_daemon_is_healthy_and_the_cli_says_so(
    running: tuple[Node, Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manager, config = running
    report = check_health(config)
    assert report.ok, report.line
    assert report.line.startswith(f"ok: daemon pid {os.getpid()}, store writable, last good sync")
    assert "api answering (unix" in report.line
    assert manager.store.get_meta("health_probe")  # the probe wrote through the store's file
    assert main(["-c", str(write_toml(tmp_path, config)), "health"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and out.count("\n") == 1


def test_an_old_last_good_sync_is_unhealthy(
    running: tuple[Node, Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manager, config = running
    limit = sync_deadline(config)
    assert limit == 3 * (60 + 30)
    manager.store.set_meta({"last_good_sync_time": f"{time.time() - limit + 30:.0f}"})
    assert check_health(config).ok
    manager.store.set_meta({"last_good_sync_time": f"{time.time() - limit - 30:.0f}"})
    report = check_health(config)
    assert not report.ok and "last successful sync" in report.line and "limit 270s" in report.line
    assert main(["-c", str(write_toml(tmp_path, config)), "health"]) == 1
    assert capsys.readouterr().out.startswith("unhealthy: last successful sync")


def test_an_api_that_does_not_answer_is_unhealthy(tmp_path: Path) -> None:
    served = make_config(tmp_path)  # the daemon serves no API ...
    manager = build_node(served, fetch=FakeAuthority().fetch)
    manager.start(serve=False)
    try:
        assert manager.sync_once().ok
        assert check_health(served).line.endswith("api disabled")
        # ... but the configuration health reads says there is a socket: nothing listens there
        expected = make_config(tmp_path, unix_socket=str(tmp_path / "nobody.sock"))
        report = check_health(expected, api_timeout=2)
        assert not report.ok and "not answering" in report.line and "nobody.sock" in report.line
    finally:
        manager.close()


def test_never_synced_is_fine_only_within_the_grace_period(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    authority = FakeAuthority()
    authority.error = AuthorityUnavailable("connection refused")
    manager = build_node(config, fetch=authority.fetch)
    manager.start(serve=False)
    try:
        assert not manager.sync_once().ok
        report = check_health(config)
        assert report.ok and "no successful sync yet" in report.line
        old = time.time() - sync_deadline(config) - 60
        os.utime(config.data_dir / "nodemanager.pid", (old, old))
        report = check_health(config)
        assert not report.ok and "no successful sync since the daemon started" in report.line
    finally:
        manager.close()


@pytest.mark.parametrize(
    ("flag", "avail", "reason"),
    [(os.ST_RDONLY, 100, "read-only file system"), (0, 0, "no space left")],
)
def test_a_read_only_or_full_store_is_unhealthy(
    running: tuple[Node, Config], monkeypatch: pytest.MonkeyPatch, flag: int, avail: int, reason: str
) -> None:
    _, config = running
    real = os.statvfs(config.data_dir)

    class Stats:
        f_flag = real.f_flag | flag
        f_bavail = avail

    monkeypatch.setattr(health.os, "statvfs", lambda path: Stats())
    report = check_health(config)
    assert not report.ok and reason in report.line


def test_a_missing_store_is_unhealthy(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    manager = build_node(config, fetch=FakeAuthority().fetch)
    manager.start(serve=False)
    try:
        (config.data_dir / "nodemanager.sqlite").rename(config.data_dir / "moved.sqlite")
        report = check_health(config)
        assert not report.ok and report.line.startswith("unhealthy: no store at")
    finally:
        manager.close()


def test_sd_notify_sends_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert listener.recv(100) == b"READY=1"
    abstract = f"nm-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + abstract)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + abstract)
        assert sd_notify("STOPPING=1") is True
        assert listener.recv(100) == b"STOPPING=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("READY=1") is False
