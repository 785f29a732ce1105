"""``nodemanager health``: one line and an exit status for systemd, monitoring and operators.

The node is healthy when, in this order (the first failure is the reason given):

1. **the daemon is up**: a process holds the data directory's lock (``data_dir/nodemanager.pid``,
   an ``flock`` the kernel drops when the process dies, so a stale pid file never looks alive);
2. **the store is writable**: the data directory's file system is neither read-only nor full, and
   a tiny write transaction (meta ``health_probe``) commits within the busy timeout;
3. **the last successful sync is recent**: meta ``last_good_sync_time`` is not older than
   3 x (``poll_interval`` + ``poll_jitter``) -- three missed polls, so one slow or failed poll is
   not an alarm; a daemon that has never synced is given the same grace from its start;
4. **the API answers**: ``Help()`` over ``api.unix_socket`` (else ``api.tcp``) within 5 s.

Why the store probe uses ``sqlite3`` directly rather than ``Store``: opening a ``Store`` runs the
start-up check, which migrates the schema and moves a damaged file aside; a health probe run next
to a live daemon must do neither. It only opens an existing file read-write, writes one meta row
and reads another.

Also here: :func:`sd_notify`, the ten-line systemd notification (``READY=1`` / ``STOPPING=1``)
for ``Type=notify``, without a dependency.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .datadir import DataDir, Meta
from .storefile import BUSY_TIMEOUT_MS, store_error

__all__ = ["API_TIMEOUT_S", "HealthReport", "check_health", "sd_notify", "sync_deadline"]

API_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The verdict: ``line`` is what ``nodemanager health`` prints."""

    ok: bool
    detail: str

    @property
    def line(self) -> str:
        return ("ok: " if self.ok else "unhealthy: ") + self.detail

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def sync_deadline(config: Config) -> float:
    """Seconds after which the last successful sync is too old: three full poll periods."""
    return 3.0 * (config.authority.poll_interval + config.authority.poll_jitter)


def _probe_store(path: Path, now: float) -> tuple[str | None, float | None]:
    """Write ``health_probe`` and read ``last_good_sync_time``: ``(problem or None, last good)``."""
    if not path.exists():
        return f"no store at {path}", None
    try:
        stats = os.statvfs(path.parent)
    except OSError as exc:
        return f"store directory {path.parent}: {exc.strerror or exc}", None
    if stats.f_flag & os.ST_RDONLY:
        return f"store {path} is on a read-only file system", None
    if stats.f_bavail == 0:
        return f"store {path}: no space left on its file system", None
    try:
        conn = sqlite3.connect(path.absolute().as_uri() + "?mode=rw", uri=True,
                               timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    except sqlite3.Error as exc:
        return f"store not writable: {store_error(path, 'open', exc)}", None
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (Meta.HEALTH_PROBE, f"{now:.0f}"),
        )
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (Meta.LAST_GOOD,)).fetchone()
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        return f"store not writable: {store_error(path, 'probe write', exc)}", None
    finally:
        conn.close()
    raw = str(row[0]) if row is not None else ""
    try:
        return None, float(raw) if raw else None
    except ValueError:
        return None, None


def _probe_api(config: Config, timeout: float) -> tuple[str | None, str]:
    """Call ``Help()``: ``(problem or None, which transport)``; ``(None, "disabled")`` if none."""
    from .api.client import local_proxy, tcp_proxy

    api = config.api
    if api.unix_socket:
        where = f"unix {api.unix_socket}"
        proxy = local_proxy(api.unix_socket, timeout=timeout)
    elif api.tcp:
        where = f"tcp {api.tcp}"
        proxy = tcp_proxy(api.tcp, timeout=timeout)
    else:
        return None, "disabled"
    try:
        with proxy:
            answer = proxy.Help()
    except (OSError, xmlrpc.client.Error, ValueError) as exc:
        return f"API on {where} not answering: {exc}", where
    if not isinstance(answer, str) or not answer:
        return f"API on {where} answered Help() with {type(answer).__name__}", where
    return None, where


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def check_health(
    config: Config, *, now: Callable[[], float] = time.time, api_timeout: float = API_TIMEOUT_S
) -> HealthReport:
    """Run the four checks of the module docstring; the first failure is the reason."""
    data_dir = config.data_dir
    files = DataDir(data_dir)
    try:
        pid = files.daemon_pid()
    except OSError as exc:
        return HealthReport(False, f"cannot check the daemon's lock in {data_dir}: {exc.strerror or exc}")
    if pid is None:
        return HealthReport(False, f"no node manager daemon is running on {data_dir}")
    started = now()
    problem, last_good = _probe_store(files.store_path, started)
    if problem is not None:
        return HealthReport(False, problem)
    deadline = sync_deadline(config)
    if last_good is None:
        try:
            up_since = files.pid_path.stat().st_mtime
        except OSError:
            up_since = 0.0
        if started - up_since > deadline:
            return HealthReport(False, f"no successful sync since the daemon started {_ago(started - up_since)}")
        sync_text = f"no successful sync yet (daemon started {_ago(started - up_since)})"
    elif started - last_good > deadline:
        return HealthReport(
            False, f"last successful sync {_ago(started - last_good)} (limit {deadline:.0f}s)"
        )
    else:
        sync_text = f"last good sync {_ago(started - last_good)}"
    problem, where = _probe_api(config, api_timeout)
    if problem is not None:
        return HealthReport(False, problem)
    api_text = "api disabled" if where == "disabled" else f"api answering ({where})"
    return HealthReport(True, f"daemon pid {pid}, store writable, {sync_text}, {api_text}")


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's notification socket, if there is one.

    Returns False (and does nothing) when not started by systemd with ``Type=notify``; never
    raises: a notification is a courtesy, not a reason to fail."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "@/":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError:
        return False
    return True
