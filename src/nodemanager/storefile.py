"""The store's database file: opening, the start-up check, schema migrations, quarantine.

Split from ``store`` (which holds the data operations) because this is the part that decides what
happens to the file itself. The contract (authority.md, "Restarting the daemon"): a file that is
not a readable SQLite database of ours is never silently replaced. It is moved aside with its
-wal/-shm to ``<path>.corrupt-<epoch>`` and reported as :class:`StoreCorrupt`; a file written by a
newer schema is refused with :class:`StoreError` and left untouched (never downgraded); every other
failure is a :class:`StoreError` carrying the operating system's reason where there is one.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from .core.errors import StoreCorrupt, StoreError

log = logging.getLogger(__name__)

#: Milliseconds a call waits for another process's lock (e.g. the CLI reading a daemon's store).
BUSY_TIMEOUT_MS = 5000

#: Schema migrations: entry ``i`` takes ``PRAGMA user_version`` from ``i`` to ``i + 1``. Append
#: only: a released entry never changes, and the code never downgrades a database.
#: Foreign keys are enforced on every connection, but version 1 declares none on purpose: a loan
#: outlives its recipient's record (it simply has no effect), and records come and go with their
#: sources independently of account states.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE slivers (
            name TEXT PRIMARY KEY NOT NULL,
            slice_id INTEGER NOT NULL,
            instantiation TEXT NOT NULL,
            expires INTEGER NOT NULL,
            timestamp INTEGER NOT NULL,
            source TEXT NOT NULL,
            keys TEXT NOT NULL,
            attributes TEXT NOT NULL,
            initscript TEXT NOT NULL,
            controller TEXT NOT NULL
        ) STRICT""",
        """CREATE TABLE accounts (
            name TEXT PRIMARY KEY NOT NULL,
            uid INTEGER,
            owned INTEGER NOT NULL CHECK (owned IN (0, 1)),
            applied TEXT NOT NULL,
            phase TEXT NOT NULL,
            failures INTEGER NOT NULL CHECK (failures >= 0),
            last_error TEXT NOT NULL,
            retry_at REAL NOT NULL,
            create_requested INTEGER NOT NULL CHECK (create_requested IN (0, 1))
        ) STRICT""",
        """CREATE TABLE loans (
            lender TEXT NOT NULL,
            position INTEGER NOT NULL,
            recipient TEXT NOT NULL,
            resource TEXT NOT NULL,
            amount INTEGER NOT NULL,
            PRIMARY KEY (lender, position)
        ) STRICT""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) STRICT",
        "CREATE TABLE ticket_marks (slice TEXT PRIMARY KEY NOT NULL, issued INTEGER NOT NULL) STRICT",
    ),
    # 2: the access signature last applied (lock state + authoritative keys), re-verified per cycle.
    ("ALTER TABLE accounts ADD COLUMN access TEXT NOT NULL DEFAULT ''",),
    # 3: daily byte budgets (bwmon): per-sliver accounting, kept after a sliver goes until its
    # period ends (``core.bwbudget.Accounting``).
    (
        """CREATE TABLE byte_budgets (
            name TEXT PRIMARY KEY NOT NULL,
            period_start REAL NOT NULL,
            used INTEGER NOT NULL CHECK (used >= 0),
            counter INTEGER,
            max_bytes INTEGER NOT NULL CHECK (max_bytes >= 0),
            thresh_bytes INTEGER NOT NULL CHECK (thresh_bytes >= 0),
            cap_kbit INTEGER
        ) STRICT""",
    ),
    # 4: a start deferred while a lease kept the sliver frozen, done when it is thawed
    # (``AccountState.start_pending``, docs/leases.md).
    ("ALTER TABLE accounts ADD COLUMN start_pending INTEGER NOT NULL DEFAULT 0",),
)
SCHEMA_VERSION = len(MIGRATIONS)
TABLES = frozenset({"slivers", "accounts", "loans", "meta", "ticket_marks"})

#: Primary SQLite result codes (the low byte of an extended code) that mean "damaged file".
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
#: Codes worth asking the operating system about (permissions, read-only, I/O, full, open).
_OS_CODES = frozenset({3, 8, 10, 13, 14})  # PERM, READONLY, IOERR, FULL, CANTOPEN


class _Damaged(Exception):
    """The file is not a usable store of ours (becomes ``StoreCorrupt`` after quarantine)."""


def open_database(path: Path) -> sqlite3.Connection:
    """Open ``path`` ready for use: data directory (0700) and file (0600) created if missing,
    WAL, ``synchronous=NORMAL`` (FULL per durable write, see ``store``), foreign keys, busy timeout, ``quick_check`` passed, schema at
    :data:`SCHEMA_VERSION`. The connection is shareable between threads (the caller locks) and in
    autocommit mode: the caller issues ``BEGIN IMMEDIATE`` / ``COMMIT`` itself."""
    _prepare_file(path)
    try:
        conn = sqlite3.connect(
            str(path),
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise store_error(path, "open", exc) from exc
    try:
        _check_and_migrate(path, conn)
    except _Damaged as damage:
        conn.close()
        where = quarantine(path)
        log.error("store %s is corrupt (%s); moved aside to %s", path, damage, where)
        raise StoreCorrupt(f"store {path} is corrupt ({damage}); moved aside to {where}") from (
            damage.__cause__ or damage
        )
    except BaseException:
        conn.close()
        raise
    return conn


def store_error(path: Path, what: str, exc: sqlite3.Error) -> StoreError:
    """A ``StoreError`` naming the file, the operation, SQLite's reason and, where the file
    system is the likely cause, what the operating system says about the directory."""
    name = getattr(exc, "sqlite_errorname", "")
    message = f"store {path}: {what} failed: {exc}" + (f" ({name})" if name else "")
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _OS_CODES:
        reason = _diagnose(path.parent)
        if reason:
            message += f"; {path.parent}: {reason}"
    return StoreError(message)


def quarantine(path: Path) -> Path:
    """Move ``path`` and its -wal/-shm aside to ``path.corrupt-<epoch>`` (never overwriting an
    earlier quarantine) and return the new location. Raises ``StoreError`` if it cannot: a
    corrupt file that stays in place must not be opened as if empty."""
    base = f"{path}.corrupt-{int(time.time())}"
    target, n = Path(base), 1
    while target.exists():
        target, n = Path(f"{base}-{n}"), n + 1
    try:
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, f"{target}{suffix}")
        os.replace(path, target)
        _fsync_directory(path.parent)
    except OSError as exc:
        raise StoreError(
            f"store {path} is corrupt and could not be moved aside to {target}: {exc}"
        ) from exc
    return target


def _check_and_migrate(path: Path, conn: sqlite3.Connection) -> None:
    """Verify the file, set the connection's pragmas and bring the schema up to date in one
    transaction. Raises ``_Damaged`` for a corrupt or foreign file, ``StoreError`` otherwise."""
    _verify(path)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("store %s: WAL unavailable, journal mode is %s", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version, tables = _schema(conn)
            _check_schema(path, version, tables)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                log.info("store %s migrated to schema version %d", path, target)
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _CORRUPT_CODES:
            raise _Damaged(str(exc)) from exc
        raise store_error(path, "open", exc) from exc


def _verify(path: Path) -> None:
    """``quick_check`` and the schema check on a separate READ-ONLY connection: a read-write
    connection that meets a damaged main file deletes its -wal when it closes, and the -wal may
    hold the last committed transactions; a read-only one leaves both for the quarantine."""
    try:
        conn = sqlite3.connect(
            path.absolute().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000
        )
    except sqlite3.Error as exc:
        raise store_error(path, "open", exc) from exc
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise _Damaged("quick_check: " + "; ".join(problems[:3]))
        _check_schema(path, *_schema(conn))
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _CORRUPT_CODES:
            raise _Damaged(str(exc)) from exc
        raise store_error(path, "check", exc) from exc
    finally:
        conn.close()


def _schema(conn: sqlite3.Connection) -> tuple[int, set[str]]:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    return version, tables


def _check_schema(path: Path, version: int, tables: set[str]) -> None:
    """Refuse a newer schema (``StoreError``, file untouched: never downgrade); call a file with
    someone else's tables, or with ours missing, damaged."""
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {path} has schema version {version}, newer than the {SCHEMA_VERSION} this"
            " node manager knows: it was written by a newer release; refusing to open it"
            " (upgrade the node manager; the file is left untouched)"
        )
    if version == 0 and tables:
        raise _Damaged(f"not a node manager store (tables {sorted(tables)}, no schema version)")
    if version > 0 and not TABLES <= tables:
        raise _Damaged(f"schema version {version} but tables {sorted(TABLES - tables)} missing")


def _prepare_file(path: Path) -> None:
    """Create the data directory (0700) and the database file (0600) if missing, and check that
    the file opens for writing, so that the operating system's own reason (permission denied,
    read-only file system) reaches the operator instead of SQLite's vaguer "unable to open
    database file"."""
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"store {path}: cannot open for writing: {exc.strerror or exc}") from exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _diagnose(directory: Path) -> str:
    """What the operating system says about writing in ``directory`` ("" when nothing wrong is
    visible): a read-only mount, a failed probe write (its errno text), or no free blocks."""
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    if stats.f_flag & os.ST_RDONLY:
        return "Read-only file system"
    probe = directory / f".store-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    if stats.f_bavail == 0:
        return "No space left on device"
    return ""
