"""The data directory (``node.data_dir``): its paths, its pid lock, and the store's meta keys.

One module owns what lives in the data directory, so the daemon, the CLI, ``health`` and
``status`` agree on every file name and every meta key instead of each spelling its own copy:

* ``nodemanager.sqlite`` -- the store (:mod:`nodemanager.store`);
* ``nodemanager.pid`` -- the pid lock: an exclusive ``flock`` held by the one process that may
  change the node (``run`` or ``sync --once``). The kernel drops it when that process dies, even
  by ``kill -9``, so a stale pid file never blocks a restart and never looks alive;
* ``images/`` -- the per-sliver disk images (``enforce.disk``).

:class:`Meta` names every key of the store's ``meta`` table.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .core.errors import NodeManagerError, StoreError

__all__ = ["AlreadyRunning", "DataDir", "Meta"]


class Meta:
    """Keys of the store's ``meta`` table (string values)."""

    #: Timestamp of the newest authority document merged (the timestamp rule).
    AUTHORITY_TIMESTAMP = "authority_timestamp"
    #: The node's bandwidth cap from that document, kbit/s ("" for none).
    BWCAP = "bwcap_kbps"
    #: When the last cycle ended, its one-line outcome, and when the last good one ended.
    LAST_SYNC = "last_sync_time"
    LAST_OUTCOME = "last_sync_outcome"
    LAST_GOOD = "last_good_sync_time"
    #: Set by ``sync --allow-mass-delete`` for the running daemon's next cycle.
    ALLOW_MASS_DELETE = "allow_mass_delete_requested"
    #: The backend kind of the daemon that last ran ("account" or "hollow").
    BACKEND = "backend"
    #: "1" after a corrupt store was set aside: our marked accounts are adopted, not conflicts.
    ADOPT = "adopt_marked_accounts"
    #: What resource enforcement cannot do on this machine ("ok": everything enforced).
    ENFORCEMENT = "enforcement_problems"
    #: What keeps sshd from reading only the node's keys for slivers ("ok" when set up).
    SSHD = "sshd_problems"
    #: The mass-deletion safety valve's memory (JSON).
    VALVE = "valve"
    #: The admin-keys handler's last outcome (JSON, ``adminkeys``): shown by ``status``.
    ADMIN_KEYS = "admin_keys_state"
    #: The configuration-files handler's last outcome (JSON, ``conffiles``): shown by ``status``.
    CONF_FILES = "conf_files_state"
    #: The newest document's lease schedule (JSON of ``core.leases.LeaseSchedule``: policy,
    #: granularity, accepted and refused leases): boundaries are kept from it (``leasing``).
    LEASES = "leases"
    #: Whether the running daemon watches the authority with blocking queries ("watching: ...")
    #: or only polls it ("polling: why"); "" before a daemon said. Shown by ``status``.
    AUTHORITY_WATCH = "authority_watch"
    #: Written by ``nodemanager health`` to prove the store is writable.
    HEALTH_PROBE = "health_probe"


class AlreadyRunning(NodeManagerError):
    """Another node manager process holds the data directory's lock."""


class DataDir:
    """The files of one node manager's data directory."""

    STORE = "nodemanager.sqlite"
    PID = "nodemanager.pid"
    IMAGES = "images"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    @property
    def store_path(self) -> Path:
        return self.root / self.STORE

    @property
    def pid_path(self) -> Path:
        return self.root / self.PID

    @property
    def images_dir(self) -> Path:
        return self.root / self.IMAGES

    # --- the pid lock -----------------------------------------------------------------------
    def lock(self) -> None:
        """Take the exclusive lock and write our pid. Raises :class:`AlreadyRunning` when another
        process holds it, ``StoreError`` when the directory cannot hold the lock file."""
        if self._lock_fd is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # e.g. a read-only or full data directory: say so, no traceback
            raise StoreError(f"cannot take the lock {self.pid_path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"another node manager (pid {self._read_pid() or '?'}) is running on {self.root}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (idempotent). The pid file stays: only the lock means "running"."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock_fd is not None

    def daemon_pid(self) -> int | None:
        """The pid of the process holding the lock; None when no process holds it; -1 when one
        does but its pid cannot be read. Raises OSError when the file cannot be opened for a
        reason other than its absence (permissions)."""
        try:
            fd = os.open(self.pid_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._read_pid() or -1
        finally:
            os.close(fd)
        return None

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None
