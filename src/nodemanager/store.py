"""SQLite (WAL) store: sliver records, account states, loans, meta, ticket replay marks, byte
budgets.

Why SQLite: the original pickled its whole database (unsafe to load, tied to class names, rewritten
in full at every change). Here every public method is exactly one transaction on one connection in
WAL mode: a crash at any instant leaves either the old or the new state, never a mix, and once a
method returns its change survives ``kill -9`` of the process.

Durability against power loss is chosen per write: ``synchronous=NORMAL`` by default (the WAL is
synced at checkpoints; a power cut may forget the last few transactions but never corrupts), and
``FULL`` for the writes whose loss could not be repaired from the next cycle: the intent to create
an account (``mark_owned``, written before ``useradd``), loans set through the API, and ticket
replay marks. Everything else is either re-derived from the next authority document or re-checked
against the machine, so one fsync per state change (0.3 ms here) would buy nothing but a 10x
slower full sync.

Threads: the daemon calls the store from the sync loop, the worker pool and the API. One connection
guarded by one lock serialises the calls, which SQLite would do for writes anyway; every method may
be called from any thread.

Failures: every ``sqlite3.Error`` leaves as :class:`StoreError` (``raise ... from``); a file that is
not a readable database of ours is moved aside and reported as :class:`StoreCorrupt`, never
replaced silently (authority.md, "Restarting the daemon"); ``storefile`` owns that part.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import msgspec

from .core.bwbudget import Accounting
from .core.errors import StoreCorrupt, StoreError
from .core.records import INSTANTIATIONS, AccountState, Loan, Phase, Sliver, ValveState
from .datadir import Meta
from .storefile import SCHEMA_VERSION, open_database, store_error
from .storerows import (
    ACCOUNT_COLUMNS,
    BUDGET_COLUMNS,
    SLIVER_COLUMNS,
    UPSERT_BUDGET,
    UPSERT_ACCOUNT,
    UPSERT_MARK,
    UPSERT_META,
    UPSERT_SLIVER,
    account_from_row,
    account_row,
    budget_from_row,
    budget_row,
    sliver_from_row,
    sliver_row,
    valve_from_text,
    valve_text,
)

__all__ = ["SCHEMA_VERSION", "Store"]

_VALVE_KEY = Meta.VALVE


class Store:
    """The node's durable memory. Every public method is one transaction; thread-safe."""

    def __init__(self, path: Path, *, deferred: bool = False) -> None:
        """Open (creating if missing) the database at ``path``; migrate the schema.

        The data directory is created with mode 0700 when missing. A file that is not a readable
        SQLite database of ours raises ``StoreCorrupt`` after the file (and its -wal/-shm) has
        been moved aside to ``path.corrupt-<epoch>``; the caller decides what next. A database
        written by a newer schema than this code knows raises ``StoreError`` and is left alone.
        Other failures (permissions, read-only or full file system) raise ``StoreError`` naming
        the operating system's reason.

        With ``deferred`` nothing is opened (the composition root builds without side effects);
        :meth:`open` opens it later, and every other method raises ``StoreError`` until then.
        """
        self.path = Path(path)
        # Re-entrant: a write and its cache update happen under one hold of the lock.
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None if deferred else open_database(self.path)
        # Write-through caches of the tables read on every cycle or operation. The daemon holding
        # the data-dir lock is their only writer (other processes such as the CLI write meta
        # only, which is therefore never cached), so they cannot go stale; they are filled on
        # first read and changed only after a successful commit.
        self._sliver_cache: dict[str, Sliver] | None = None
        self._account_cache: dict[str, AccountState] | None = None
        self._loan_cache: dict[str, tuple[Loan, ...]] | None = None
        #: Byte accounting (``bwmon``): read by every enforcement pass, written by one poller.
        self._budget_cache: dict[str, Accounting] | None = None
        #: Held by every read-decide-write of sliver records by different writers (a sync's
        #: merge, a ticket's redemption), so neither decides on records the other is changing.
        self.records_lock = threading.RLock()

    def open(self) -> str | None:
        """Open a deferred store. A corrupt file is quarantined and an empty store started: the
        reason is returned (None when all was well). Other failures raise ``StoreError``."""
        with self._lock:
            if self._conn is not None:
                return None
            try:
                self._conn = open_database(self.path)
            except StoreCorrupt as exc:
                self._conn = open_database(self.path)
                return str(exc)
            return None

    def close(self) -> None:
        """Close the connection (idempotent). Later calls raise ``StoreError``."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._sliver_cache = self._account_cache = self._loan_cache = self._budget_cache = None

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- sliver records (what the sources say) ---
    def slivers(self) -> dict[str, Sliver]:
        """Every record, keyed by name (a new dict; the values are shared frozen objects)."""
        with self._lock:
            if self._sliver_cache is None:
                with self._transaction("read slivers", write=False) as conn:
                    rows = conn.execute(f"SELECT {SLIVER_COLUMNS} FROM slivers").fetchall()
                with self._converting("unreadable sliver records"):
                    self._sliver_cache = {row[0]: sliver_from_row(row) for row in rows}
            return dict(self._sliver_cache)

    def sliver(self, name: str) -> Sliver | None:
        cache = self._sliver_cache
        if cache is not None:
            return cache.get(name)
        with self._transaction("read sliver", write=False) as conn:
            row = conn.execute(
                f"SELECT {SLIVER_COLUMNS} FROM slivers WHERE name = ?", (name,)
            ).fetchone()
        with self._converting(f"unreadable sliver record {name!r}"):
            return None if row is None else sliver_from_row(row)

    def apply_records(
        self,
        upserts: Iterable[Sliver],
        deletes: Iterable[str],
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Upsert and delete records and set meta keys in ONE transaction.

        Deletes run after upserts (a name in both ends up deleted); deleting an absent name is not
        an error. Nothing at all is written when all three are empty.
        """
        upserts = list(upserts)
        with self._converting("cannot store sliver records"):
            rows = [sliver_row(s) for s in upserts]
        names = [(name,) for name in deletes]
        pairs = list((meta or {}).items())
        if not rows and not names and not pairs:
            return
        with self._lock:
            with self._transaction("apply records") as conn:
                conn.executemany(UPSERT_SLIVER, rows)
                conn.executemany("DELETE FROM slivers WHERE name = ?", names)
                conn.executemany(UPSERT_META, pairs)
            if self._sliver_cache is not None:
                self._sliver_cache.update((s.name, s) for s in upserts)
                for (name,) in names:
                    self._sliver_cache.pop(name, None)

    # --- account states (what the node made) ---
    def accounts(self) -> dict[str, AccountState]:
        with self._lock:
            if self._account_cache is None:
                with self._transaction("read accounts", write=False) as conn:
                    rows = conn.execute(f"SELECT {ACCOUNT_COLUMNS} FROM accounts").fetchall()
                with self._converting("unreadable account states"):
                    self._account_cache = {row[0]: account_from_row(row) for row in rows}
            return dict(self._account_cache)

    def account(self, name: str) -> AccountState | None:
        cache = self._account_cache
        if cache is not None:
            return cache.get(name)
        with self._transaction("read account", write=False) as conn:
            row = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = ?", (name,)
            ).fetchone()
        with self._converting(f"unreadable account state {name!r}"):
            return None if row is None else account_from_row(row)

    def put_account(self, state: AccountState) -> None:
        """Insert or replace the state of ``state.name``."""
        with self._converting(f"cannot store account state {state.name!r}"):
            row = account_row(state)
        with self._lock:
            with self._transaction("write account") as conn:
                conn.execute(UPSERT_ACCOUNT, row)
            if self._account_cache is not None:
                self._account_cache[state.name] = state

    def record_failure(self, name: str, error: str, retry_at: float, phase: Phase = Phase.FAILED) -> AccountState:
        """Count one more failed operation for ``name`` and return the new state.

        Sets ``phase`` (FAILED; DESTROYING for a failed destroy, which stays a destroy to finish),
        ``last_error`` and ``retry_at``, keeping the other fields. When no state exists yet (the
        very first create failed) one is made with ``owned=False``: the node made nothing it may
        later remove.
        """
        with self._lock:
            with self._transaction("record failure") as conn:
                row = conn.execute(
                    f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = ?", (name,)
                ).fetchone()
                with self._converting(f"unreadable account state {name!r}"):
                    old = AccountState(name=name) if row is None else account_from_row(row)
                new = AccountState(
                    name=name,
                    uid=old.uid,
                    owned=old.owned,
                    applied=old.applied,
                    phase=Phase(phase),
                    failures=old.failures + 1,
                    last_error=error,
                    retry_at=float(retry_at),
                    create_requested=old.create_requested,
                    access=old.access,
                    start_pending=old.start_pending,
                )
                conn.execute(UPSERT_ACCOUNT, account_row(new))
            if self._account_cache is not None:
                self._account_cache[name] = new
        return new

    def mark_owned(self, names: Iterable[str]) -> None:
        """Durably record the intent to create the accounts of ``names``, in one transaction,
        before any ``useradd`` runs: if the daemon dies right after, the next cycle knows the
        account is its own. A missing state becomes ``AccountState(name, owned=True)``; a state
        not yet owned becomes owned with ``uid`` None and phase ABSENT (failures, error and
        ``create_requested`` kept); an owned state is left alone. Idempotent; no names, no write.
        """
        rows = [(name,) for name in names]
        if not rows:
            return
        with self._lock:
            self._mark_owned(rows)
            cache = self._account_cache
            if cache is not None:
                for (name,) in rows:
                    old = cache.get(name)
                    if old is None:
                        cache[name] = AccountState(name=name, owned=True)
                    elif not old.owned:
                        cache[name] = replace(old, owned=True, uid=None, phase=Phase.ABSENT)

    def _mark_owned(self, rows: list[tuple[str]]) -> None:
        with self._transaction("mark owned", durable=True) as conn:
            conn.executemany(
                f"INSERT INTO accounts ({ACCOUNT_COLUMNS}) "
                f"VALUES (?, NULL, 1, '', '{Phase.ABSENT.value}', 0, '', 0.0, 0, '', 0) "
                f"ON CONFLICT (name) DO UPDATE SET owned = 1, uid = NULL, "
                f"phase = '{Phase.ABSENT.value}' WHERE owned = 0",
                rows,
            )

    def finish_destroy(self, name: str) -> None:
        """After a successful destroy: delete the account state, the record of that name (the
        destroy happened because it expired or left its source) and the loans it made as lender,
        in one transaction. Loans naming it as recipient stay; they simply have no effect."""
        with self._lock:
            with self._transaction("finish destroy") as conn:
                conn.execute("DELETE FROM accounts WHERE name = ?", (name,))
                conn.execute("DELETE FROM slivers WHERE name = ?", (name,))
                conn.execute("DELETE FROM loans WHERE lender = ?", (name,))
            if self._account_cache is not None:
                self._account_cache.pop(name, None)
            if self._sliver_cache is not None:
                self._sliver_cache.pop(name, None)
            self._loan_cache = None

    # --- loans ---
    def loans(self) -> dict[str, tuple[Loan, ...]]:
        """Every lender's loans, in the order they were set."""
        with self._lock:
            if self._loan_cache is None:
                with self._transaction("read loans", write=False) as conn:
                    rows = conn.execute(
                        "SELECT lender, recipient, resource, amount FROM loans ORDER BY lender, position"
                    ).fetchall()
                result: dict[str, list[Loan]] = {}
                for lender, recipient, resource, amount in rows:
                    result.setdefault(lender, []).append(Loan(recipient, resource, amount))
                self._loan_cache = {lender: tuple(loans) for lender, loans in result.items()}
            return dict(self._loan_cache)

    def set_loans(self, lender: str, loans: Iterable[Loan]) -> None:
        """Replace all of ``lender``'s loans (an empty iterable removes them)."""
        rows = [(lender, i, ln.recipient, ln.resource, ln.amount) for i, ln in enumerate(loans)]
        with self._lock:
            self._loan_cache = None
            self._set_loans(lender, rows)

    def _set_loans(self, lender: str, rows: list[tuple[str, int, str, str, int]]) -> None:
        with self._transaction("set loans", durable=True) as conn:
            conn.execute("DELETE FROM loans WHERE lender = ?", (lender,))
            conn.executemany(
                "INSERT INTO loans (lender, position, recipient, resource, amount) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    # --- meta (key/value strings: last sync outcome, authority timestamp, valve) ---
    def get_meta(self, key: str, default: str = "") -> str:
        """The meta value of ``key`` (see ``datadir.Meta``), or ``default`` when unset."""
        with self._transaction("read meta", write=False) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, values: Mapping[str, str]) -> None:
        """Set several keys in one transaction; an empty mapping writes nothing."""
        pairs = list(values.items())
        if not pairs:
            return
        with self._transaction("write meta") as conn:
            conn.executemany(UPSERT_META, pairs)

    def valve(self) -> ValveState:
        """The safety valve's memory (an empty ``ValveState`` when never set)."""
        raw = self.get_meta(_VALVE_KEY)
        try:
            return valve_from_text(raw)
        except (msgspec.DecodeError, KeyError, ValueError) as exc:
            raise StoreError(f"store {self.path}: unreadable valve state: {exc}") from exc

    def set_valve(self, valve: ValveState) -> None:
        self.set_meta({_VALVE_KEY: valve_text(valve)})

    # --- ticket replay marks (issue 4) ---
    def ticket_mark(self, slice_name: str) -> int | None:
        """The ``issued`` time of the last accepted ticket for the slice, if any."""
        with self._transaction("read ticket mark", write=False) as conn:
            row = conn.execute(
                "SELECT issued FROM ticket_marks WHERE slice = ?", (slice_name,)
            ).fetchone()
        return None if row is None else int(row[0])

    def redeem_ticket(self, sliver: Sliver, issued: int) -> bool:
        """Store a verified ticket's record and its replay mark in ONE durable transaction.

        Returns False and writes nothing when the slice's mark is already ``>= issued`` (checked
        inside the transaction, so two deliveries of one ticket racing each other cannot both
        win). A crash leaves either both written or neither: never a record without its mark
        (which would let the same ticket be redeemed again) nor a mark without its record.
        """
        return self.redeem_tickets((sliver,), issued)

    def redeem_tickets(self, slivers: Sequence[Sliver], issued: int) -> bool:
        """:meth:`redeem_ticket` for every sliver of one ticket, all in ONE durable transaction:
        False and nothing written when any of the slices' marks is already ``>= issued``."""
        rows = []
        for sliver in slivers:
            with self._converting(f"cannot store sliver record {sliver.name!r}"):
                rows.append(sliver_row(sliver))
        with self._lock:
            with self._transaction("redeem ticket", durable=True) as conn:
                for sliver in slivers:
                    mark = conn.execute(
                        "SELECT issued FROM ticket_marks WHERE slice = ?", (sliver.name,)
                    ).fetchone()
                    if mark is not None and int(mark[0]) >= issued:
                        return False
                for sliver, row in zip(slivers, rows, strict=True):
                    conn.execute(UPSERT_SLIVER, row)
                    conn.execute(UPSERT_MARK, (sliver.name, issued))
            if self._sliver_cache is not None:
                for sliver in slivers:
                    self._sliver_cache[sliver.name] = sliver
        return True

    # --- daily byte budgets (bwmon) ---
    def byte_budgets(self) -> dict[str, Accounting]:
        """Every sliver's byte accounting (also of slivers gone, until their period ends)."""
        with self._lock:
            if self._budget_cache is None:
                with self._transaction("read byte budgets", write=False) as conn:
                    rows = conn.execute(f"SELECT {BUDGET_COLUMNS} FROM byte_budgets").fetchall()
                with self._converting("unreadable byte budget"):
                    self._budget_cache = {row[0]: budget_from_row(row) for row in rows}
            return dict(self._budget_cache)

    def put_byte_budgets(self, rows: Iterable[Accounting], drop: Iterable[str] = ()) -> None:
        """Write ``rows`` and delete the accounting of ``drop``, in one transaction (a power
        cut may forget the last poll's bytes, never half of it)."""
        with self._converting("cannot store byte budget"):
            values = [budget_row(a) for a in rows]
        names = [(name,) for name in drop]
        if not values and not names:
            return
        with self._lock:
            with self._transaction("write byte budgets") as conn:
                conn.executemany(UPSERT_BUDGET, values)
                conn.executemany("DELETE FROM byte_budgets WHERE name = ?", names)
            self._budget_cache = None  # re-read once: rows are few and written once per poll

    # --- status ---
    def counts(self) -> dict[str, int]:
        """Records per instantiation (``records.<instantiation>``) and account states per phase
        (``accounts.<phase>``), every known value present (0 when none), plus the totals
        ``records`` and ``accounts``: cheap numbers for ``status`` and metrics."""
        with self._transaction("count", write=False) as conn:
            by_inst = conn.execute(
                "SELECT instantiation, count(*) FROM slivers GROUP BY instantiation"
            ).fetchall()
            by_phase = conn.execute("SELECT phase, count(*) FROM accounts GROUP BY phase").fetchall()
        result = {f"records.{inst}": 0 for inst in INSTANTIATIONS}
        result.update({f"accounts.{phase.value}": 0 for phase in Phase})
        for inst, n in by_inst:
            result[f"records.{inst}"] = n
        for phase, n in by_phase:
            result[f"accounts.{phase}"] = n
        result["records"] = sum(n for _, n in by_inst)
        result["accounts"] = sum(n for _, n in by_phase)
        return result

    # --- internals ---
    @contextlib.contextmanager
    def _transaction(self, what: str, write: bool = True, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the lock for one transaction: ``BEGIN IMMEDIATE`` for writes (the write lock is
        taken up front, so a busy database fails at BEGIN, not half-way), plain ``BEGIN`` for
        reads (one consistent snapshot). Rolls back on any exception; sqlite3 errors and values
        SQLite cannot bind become ``StoreError``."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"store {self.path} is closed")
            try:
                if durable:
                    conn.execute("PRAGMA synchronous = FULL")
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise store_error(self.path, what, exc) from exc
                if isinstance(exc, (ValueError, TypeError, OverflowError)):  # binding a bad value
                    raise StoreError(f"store {self.path}: {what} failed: {exc}") from exc
                raise
            finally:
                if durable:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("PRAGMA synchronous = NORMAL")

    @contextlib.contextmanager
    def _converting(self, what: str) -> Iterator[None]:
        """Turn a value that does not convert into ``StoreError``: on the way in a caller's bad
        value (an int beyond 64 bits, a string that is not UTF-8), on the way out a stored value
        that no longer decodes (bad JSON, unknown phase), which means damage or tampering."""
        try:
            yield
        except (msgspec.MsgspecError, ValueError, TypeError, OverflowError) as exc:
            raise StoreError(f"store {self.path}: {what}: {exc}") from exc
