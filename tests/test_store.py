"""The SQLite store: round-trips, one transaction per call, schema versions, corruption, OS errors."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nodemanager.core.errors import StoreCorrupt, StoreError
from nodemanager.core.records import (
    DELEGATED,
    INSTANTIATIONS,
    NM_CONTROLLER,
    PLC_INSTANTIATED,
    SOURCE_TICKET,
    AccountState,
    Loan,
    Phase,
    Sliver,
    ValveState,
)
from nodemanager.store import SCHEMA_VERSION, Store

IS_ROOT = os.geteuid() == 0


def sliver(name: str, **changes: object) -> Sliver:
    fields: dict[str, object] = {
        "name": name,
        "slice_id": 12,
        "instantiation": PLC_INSTANTIATED,
        "expires": 1_900_000_000,
        "timestamp": 1_700_000_000,
        "keys": ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl bob@host",),
        "attributes": (("cpu_share", "2"), ("vsys", "pl")),
    }
    fields.update(changes)
    return Sliver(**fields)  # type: ignore[arg-type]


#: Realistic awkward values: unicode key comments, repeated tags, empty strings, a script.
AWKWARD = (
    sliver(
        "princeton_sirius",
        keys=("ssh-rsa AAAAB3NzaC1yc2E jürgen@hôte", "ssh-ed25519 AAAAC3 ключ@узел", ""),
        attributes=(("vsys", "pl"), ("vsys", "fuse"), ("hrn", ""), ("", "")),
        initscript="#!/bin/sh\necho 'hello \"world\"' \\\n  >/tmp/x\n",
        controller="",
    ),
    sliver("site_empty", keys=(), attributes=(), slice_id=0, expires=0, timestamp=0),
    sliver(
        "site_delegated",
        instantiation=DELEGATED,
        source=SOURCE_TICKET,
        controller="site_ctl",
        attributes=(("emoji", "\U0001f680"), ("nul", "a\x00b")),
    ),
    sliver("site_ctl", instantiation=NM_CONTROLLER, slice_id=2**40),
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "store.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    """A separate connection, as another process would have."""
    return sqlite3.connect(str(path), isolation_level=None)


def quarantined(path: Path) -> list[Path]:
    """The quarantined main files (their -wal/-shm, if any, sit beside them)."""
    found = path.parent.glob(path.name + ".corrupt-*")
    return sorted(p for p in found if not p.name.endswith(("-wal", "-shm")))


# --- opening, schema ---

def test_new_store_creates_private_dir_and_current_schema(store: Store, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) & 0o077 == 0
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {
            r[1]: r[5] for r in conn.execute("PRAGMA table_list") if r[0] == "main"
        }
    finally:
        conn.close()
    for table in ("slivers", "accounts", "loans", "meta", "ticket_marks"):
        assert tables[table] == 1, f"{table} is not STRICT"
    own = store._conn  # per-connection settings can only be read on the store's own connection
    assert own is not None
    assert own.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL; FULL per durable write
    assert own.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert own.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_empty_file_is_migrated(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"")
    with Store(db_path) as s:
        assert s.slivers() == {}
        assert s.accounts() == {}
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()
    assert quarantined(db_path) == []


def test_version_1_store_is_migrated_keeping_its_rows(db_path: Path) -> None:
    """Schema 2 added ``accounts.access``: a store written by schema 1 keeps every row and
    reads the new column as "" (no signature recorded yet)."""
    from nodemanager.storefile import MIGRATIONS

    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO accounts VALUES ('site_a', 1234, 1, 'fp', 'running', 0, '', 0.0, 0)")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Store(db_path) as s:
        assert s.account("site_a") == AccountState(
            name="site_a", uid=1234, owned=True, applied="fp", phase=Phase.RUNNING, access="")
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    finally:
        conn.close()


def test_version_2_store_is_migrated_to_byte_budgets(db_path: Path) -> None:
    """Schema 3 added the ``byte_budgets`` table (bwmon): a schema-2 store keeps its rows, starts
    with no accounting, and byte accounting round-trips through a reopening."""
    from nodemanager.core.bwbudget import Accounting
    from nodemanager.storefile import MIGRATIONS

    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in (*MIGRATIONS[0], *MIGRATIONS[1]):
        conn.execute(statement)
    conn.execute("INSERT INTO accounts VALUES ('site_a', 1234, 1, 'fp', 'running', 0, '', 0.0, 0, 'sig')")
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    rows = [Accounting("site_a", 1000.5, 2**40, 2**40 + 7, 2**41, 2**40, 96), Accounting("site_b", 3.0)]
    with Store(db_path) as s:
        assert s.account("site_a") is not None and s.account("site_a").access == "sig"
        assert s.byte_budgets() == {}
        s.put_byte_budgets(rows)
    assert quarantined(db_path) == []
    with Store(db_path) as s:
        assert s.byte_budgets() == {a.name: a for a in rows}
        s.put_byte_budgets([replace(rows[1], used=5)], drop=["site_a"])
        assert s.byte_budgets() == {"site_b": replace(rows[1], used=5)}


def test_version_3_store_is_migrated_to_start_pending(db_path: Path) -> None:
    """Schema 4 added ``accounts.start_pending`` (a start deferred by a lease): a schema-3 store
    keeps every row, reads the new column as False, and the flag round-trips through a reopening."""
    from nodemanager.storefile import MIGRATIONS

    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in (*MIGRATIONS[0], *MIGRATIONS[1], *MIGRATIONS[2]):
        conn.execute(statement)
    conn.execute("INSERT INTO accounts VALUES ('site_a', 1234, 1, 'fp', 'stopped', 2, 'e', 5.0, 1, 'sig')")
    conn.execute("INSERT INTO byte_budgets VALUES ('site_a', 1.0, 7, NULL, 100, 50, NULL)")
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with Store(db_path) as s:
        assert s.account("site_a") == AccountState(
            name="site_a", uid=1234, owned=True, applied="fp", phase=Phase.STOPPED, failures=2,
            last_error="e", retry_at=5.0, create_requested=True, access="sig", start_pending=False)
        assert s.byte_budgets()["site_a"].used == 7
        s.put_account(replace(s.account("site_a"), start_pending=True))  # type: ignore[arg-type]
        s.record_failure("site_a", "again", 9.0)
    assert quarantined(db_path) == []
    with Store(db_path) as s:
        state = s.account("site_a")
        assert state is not None and state.start_pending and state.failures == 3  # kept by a failure
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    finally:
        conn.close()


def test_newer_schema_is_refused_and_left_untouched(db_path: Path) -> None:
    Store(db_path).close()
    conn = raw(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="schema version 99, newer") as info:
        Store(db_path)
    assert not isinstance(info.value, StoreCorrupt)
    assert db_path.read_bytes() == before
    assert quarantined(db_path) == []


def test_data_survives_reopen(db_path: Path) -> None:
    with Store(db_path) as s:
        s.apply_records(AWKWARD, [], {"authority.timestamp": "1700000000"})
        s.put_account(AccountState("site_ctl", uid=1001, owned=True, phase=Phase.RUNNING))
    with Store(db_path) as s:
        assert s.slivers() == {x.name: x for x in AWKWARD}
        assert s.account("site_ctl") == AccountState(
            "site_ctl", uid=1001, owned=True, phase=Phase.RUNNING
        )
        assert s.get_meta("authority.timestamp") == "1700000000"


# --- records ---

def test_records_round_trip(store: Store) -> None:
    store.apply_records(AWKWARD, [])
    assert store.slivers() == {x.name: x for x in AWKWARD}
    for x in AWKWARD:
        got = store.sliver(x.name)
        assert got == x
        assert got is not None and isinstance(got.keys, tuple)  # hashable, like the source's
        assert all(type(pair) is tuple for pair in got.attributes)
    assert store.sliver("site_missing") is None


def test_apply_records_upserts_deletes_and_sets_meta_together(store: Store) -> None:
    store.apply_records([sliver("site_a"), sliver("site_b"), sliver("site_c")], [])
    newer = sliver("site_a", timestamp=1_800_000_000, keys=(), attributes=(("cpu_pct", "25"),))
    store.apply_records(
        [newer, sliver("site_d")], ["site_b", "site_never_existed"], {"k1": "v1", "k2": ""}
    )
    assert set(store.slivers()) == {"site_a", "site_c", "site_d"}
    assert store.sliver("site_a") == newer
    assert store.get_meta("k1") == "v1"
    assert store.get_meta("k2", "default") == ""
    store.apply_records([sliver("site_e")], ["site_e"])  # deletes run after upserts
    assert store.sliver("site_e") is None


def test_apply_records_accepts_generators(store: Store) -> None:
    store.apply_records((sliver(f"site_{i}") for i in range(3)), iter(()), None)
    assert len(store.slivers()) == 3


@pytest.mark.parametrize(
    ("bad", "cause"),
    [("record", sqlite3.IntegrityError), ("meta", sqlite3.IntegrityError),
     ("overflow", OverflowError)],
)
def test_failed_apply_records_leaves_nothing(store: Store, bad: str, cause: type) -> None:
    store.apply_records([sliver("site_old")], [], {"gen": "1"})
    upserts = [sliver("site_new1"), sliver("site_old", slice_id=99)]
    meta: dict[str, object] = {"gen": "2"}
    if bad == "record":  # a STRICT column refuses it half-way through executemany
        upserts.insert(1, sliver("site_bad", slice_id="not-a-number"))
    elif bad == "overflow":  # sqlite3 cannot even bind it, half-way through executemany
        upserts.insert(1, sliver("site_bad", expires=2**70))
    else:  # every record is written before the meta row fails NOT NULL
        meta["broken"] = None
    with pytest.raises(StoreError) as info:
        store.apply_records(upserts, ["site_old"], meta)  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, cause)
    assert store.slivers() == {"site_old": sliver("site_old")}
    assert store.get_meta("gen") == "1"
    store.apply_records([sliver("site_after")], [])  # lock released, connection usable
    assert store.sliver("site_after") is not None


def test_noop_apply_records_writes_nothing(store: Store, db_path: Path) -> None:
    store.apply_records([sliver("site_a")], [])
    other = raw(db_path)
    try:
        version = other.execute("PRAGMA data_version").fetchone()[0]
        files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in db_path.parent.iterdir()}
        store.apply_records([], [], None)
        store.apply_records([], [], {})
        store.set_meta({})
        assert other.execute("PRAGMA data_version").fetchone()[0] == version
        assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in db_path.parent.iterdir()} \
            == files
        store.apply_records([], ["site_a"])  # a real change is visible to the same probe
        assert other.execute("PRAGMA data_version").fetchone()[0] != version
    finally:
        other.close()


def test_ten_thousand_upserts(store: Store) -> None:
    records = [
        sliver(f"site_s{i}", slice_id=i, attributes=(("vsys", "pl"), ("vsys", "fuse")))
        for i in range(10_000)
    ]
    store.apply_records(records, [], {"count": "10000"})
    loaded = store.slivers()
    assert len(loaded) == 10_000
    assert loaded["site_s9999"] == records[-1]


# --- account states ---

def test_accounts_round_trip(store: Store) -> None:
    states = [
        AccountState("site_a"),
        AccountState(
            "site_b", uid=1234, owned=True, applied="0f" * 16, phase=Phase.RUNNING, failures=3,
            last_error="useradd: exit 9 — ünïcode", retry_at=1_700_000_123.25,
            create_requested=True,
        ),
        AccountState("site_c", uid=0, phase=Phase.DESTROYING, retry_at=0.0),
        AccountState("site_d", uid=1235, owned=True, phase=Phase.STOPPED, start_pending=True),
    ]
    for state in states:
        store.put_account(state)
    assert store.accounts() == {s.name: s for s in states}
    assert store.account("site_b") == states[1]
    assert store.account("site_missing") is None
    replaced = AccountState("site_b", uid=1234, owned=True, phase=Phase.STOPPED)
    store.put_account(replaced)
    assert store.account("site_b") == replaced
    store.finish_destroy("site_a")
    store.finish_destroy("site_missing")
    assert set(store.accounts()) == {"site_b", "site_c", "site_d"}


def test_bad_account_values_raise_store_error(store: Store) -> None:
    with pytest.raises(StoreError, match="cannot store account state"):
        store.put_account(AccountState("site_a", phase="levitating"))  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.put_account(AccountState("site_a", uid=2**64))
    assert store.accounts() == {}


def test_record_failure_creates_an_unowned_state(store: Store) -> None:
    state = store.record_failure("site_new", "useradd: name in use", 1_700_000_060.5)
    assert state == AccountState(
        "site_new", owned=False, phase=Phase.FAILED, failures=1,
        last_error="useradd: name in use", retry_at=1_700_000_060.5,
    )
    assert store.account("site_new") == state


def test_record_failure_counts_and_keeps_other_fields(store: Store) -> None:
    store.put_account(AccountState("site_a", uid=1500, owned=True, applied="abc",
                                   phase=Phase.RUNNING, create_requested=True))
    store.record_failure("site_a", "first", 10.0)
    state = store.record_failure("site_a", "second", 20)
    assert state == AccountState("site_a", uid=1500, owned=True, applied="abc",
                                 phase=Phase.FAILED, failures=2, last_error="second",
                                 retry_at=20.0, create_requested=True)
    assert store.account("site_a") == state


def test_record_failure_is_atomic_across_threads(store: Store) -> None:
    def hammer() -> None:
        for _ in range(25):
            store.record_failure("site_busy", "again", 1.0)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = store.account("site_busy")
    assert state is not None and state.failures == 150


def test_mark_owned(store: Store, db_path: Path) -> None:
    running = AccountState("site_run", uid=1001, owned=True, applied="f", phase=Phase.RUNNING)
    store.put_account(running)
    store.record_failure("site_conflict", "exists", 5.0)  # unowned, failed once
    store.mark_owned(["site_new", "site_run", "site_conflict"])
    assert store.account("site_new") == AccountState("site_new", owned=True)
    assert store.account("site_run") == running
    assert store.account("site_conflict") == AccountState(
        "site_conflict", owned=True, phase=Phase.ABSENT, failures=1, last_error="exists",
        retry_at=5.0,
    )
    other = raw(db_path)
    try:
        version = other.execute("PRAGMA data_version").fetchone()[0]
        store.mark_owned([])
        assert other.execute("PRAGMA data_version").fetchone()[0] == version
    finally:
        other.close()


def test_finish_destroy(store: Store) -> None:
    store.apply_records([sliver("site_gone"), sliver("site_kept")], [])
    store.put_account(AccountState("site_gone", uid=1001, owned=True, phase=Phase.DESTROYING))
    store.put_account(AccountState("site_kept", uid=1002, owned=True))
    store.set_loans("site_gone", [Loan("site_kept", "cpu_share", 1)])
    store.set_loans("site_kept", [Loan("site_gone", "net_share", 2)])
    store.finish_destroy("site_gone")
    assert set(store.slivers()) == {"site_kept"}
    assert set(store.accounts()) == {"site_kept"}
    assert store.loans() == {"site_kept": (Loan("site_gone", "net_share", 2),)}
    store.finish_destroy("site_gone")  # idempotent
    store.finish_destroy("site_never")
    assert set(store.slivers()) == {"site_kept"}


# --- loans, meta, valve, ticket marks, counts ---

def test_loans_keep_order_and_are_replaced(store: Store) -> None:
    first = [Loan("site_b", "cpu_share", 3), Loan("site_a", "net_min_rate", 100),
             Loan("site_b", "cpu_share", 1)]
    store.set_loans("site_l", first)
    store.set_loans("site_m", [Loan("site_l", "disk_max", 2**33)])
    assert store.loans() == {"site_l": tuple(first),
                             "site_m": (Loan("site_l", "disk_max", 2**33),)}
    store.set_loans("site_l", iter([Loan("site_c", "cpu_pct", 5)]))
    assert store.loans()["site_l"] == (Loan("site_c", "cpu_pct", 5),)
    store.set_loans("site_l", [])
    assert "site_l" not in store.loans()


def test_meta(store: Store) -> None:
    assert store.get_meta("missing") == ""
    assert store.get_meta("missing", "dflt") == "dflt"
    store.set_meta({"sync.outcome": "ok", "note": "héllo\nworld", "empty": ""})
    store.set_meta({"sync.outcome": "failed: timeout"})
    assert store.get_meta("sync.outcome") == "failed: timeout"
    assert store.get_meta("note") == "héllo\nworld"
    assert store.get_meta("empty", "dflt") == ""


def test_valve_round_trip(store: Store) -> None:
    assert store.valve() == ValveState()
    held = ValveState(held=frozenset({"site_a", "site_b"}), seen=1)
    store.set_valve(held)
    assert store.valve() == held
    store.set_valve(ValveState())
    assert store.valve() == ValveState()


def test_ticket_marks(store: Store) -> None:
    assert store.ticket_mark("site_d") is None
    ticket = Sliver(name="site_d", slice_id=4, instantiation=DELEGATED, expires=2**31 - 1, timestamp=0)
    assert store.redeem_ticket(ticket, 1_700_000_000)
    assert store.redeem_ticket(replace(ticket, name="site_e"), 5)
    assert store.redeem_ticket(ticket, 1_700_000_100)
    assert not store.redeem_ticket(ticket, 1_700_000_100)  # not newer: refused, nothing written
    assert store.ticket_mark("site_d") == 1_700_000_100
    assert store.ticket_mark("site_e") == 5


def test_counts(store: Store) -> None:
    empty = store.counts()
    assert empty["records"] == 0 and empty["accounts"] == 0
    assert all(empty[f"records.{i}"] == 0 for i in INSTANTIATIONS)
    assert all(empty[f"accounts.{p.value}"] == 0 for p in Phase)
    store.apply_records(AWKWARD, [])
    store.put_account(AccountState("site_a", phase=Phase.RUNNING))
    store.put_account(AccountState("site_b", phase=Phase.RUNNING))
    store.record_failure("site_c", "boom", 1.0)
    counts = store.counts()
    assert counts["records"] == 4
    assert counts[f"records.{PLC_INSTANTIATED}"] == 2
    assert counts[f"records.{DELEGATED}"] == 1
    assert counts["accounts"] == 3
    assert counts["accounts.running"] == 2
    assert counts["accounts.failed"] == 1


# --- unreadable rows, closed store ---

@pytest.mark.parametrize(
    ("sql", "read"),
    [
        ("UPDATE slivers SET keys = 'not json'", "slivers"),
        ("UPDATE slivers SET attributes = '[[\"only-tag\"]]'", "slivers"),
        ("UPDATE accounts SET phase = 'levitating'", "accounts"),
        ("INSERT INTO meta VALUES ('valve', '{\"held\": 3, \"seen\": 1}')", "valve"),
    ],
)
def test_tampered_rows_raise_store_error(
    store: Store, db_path: Path, sql: str, read: str
) -> None:
    store.apply_records([sliver("site_a")], [])
    store.put_account(AccountState("site_a"))
    conn = raw(db_path)
    conn.execute(sql)
    conn.close()
    with pytest.raises(StoreError, match="unreadable"):
        getattr(store, read)()


def test_closed_store_raises(db_path: Path) -> None:
    s = Store(db_path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.slivers()


# --- corruption and quarantine ---

def test_random_bytes_are_quarantined(db_path: Path) -> None:
    db_path.parent.mkdir()
    garbage = b"NOT SQLITE" + os.urandom(8182)
    db_path.write_bytes(garbage)
    Path(f"{db_path}-wal").write_bytes(b"stale wal")
    with pytest.raises(StoreCorrupt) as info:
        Store(db_path)
    [moved] = quarantined(db_path)
    assert str(moved) in str(info.value)
    assert moved.read_bytes() == garbage
    assert Path(f"{moved}-wal").read_bytes() == b"stale wal"
    assert not db_path.exists() and not Path(f"{db_path}-wal").exists()


def test_truncated_database_is_quarantined(db_path: Path) -> None:
    with Store(db_path) as s:
        s.apply_records(
            [sliver(f"site_s{i}", initscript="x" * 400) for i in range(2000)], []
        )
    data = db_path.read_bytes()
    assert len(data) > 400_000 and not Path(f"{db_path}-wal").exists()
    db_path.write_bytes(data[: len(data) // 2 + 1000])
    with pytest.raises(StoreCorrupt, match="moved aside"):
        Store(db_path)
    assert len(quarantined(db_path)) == 1


def test_foreign_database_is_quarantined(db_path: Path) -> None:
    db_path.parent.mkdir()
    conn = raw(db_path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(StoreCorrupt, match="not a node manager store"):
        Store(db_path)


def opened(path: Path) -> tuple[Store, str | None]:
    """A deferred store, opened: the store and the reason it was quarantined (or None)."""
    store = Store(path, deferred=True)
    return store, store.open()


def test_open_quarantines_a_corrupt_store(db_path: Path) -> None:
    s, reason = opened(db_path)
    with s:
        assert reason is None
        s.apply_records([sliver("site_a")], [])
    db_path.write_bytes(b"\x00garbage" * 100)
    s, reason = opened(db_path)
    with s:
        assert reason is not None and "corrupt" in reason
        [moved] = quarantined(db_path)
        assert str(moved) in reason
        assert s.slivers() == {}
        s.apply_records([sliver("site_b")], [])
        assert set(s.slivers()) == {"site_b"}


def test_open_does_not_replace_a_newer_store(db_path: Path) -> None:
    Store(db_path).close()
    conn = raw(db_path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(StoreError):
        Store(db_path, deferred=True).open()
    assert quarantined(db_path) == []


# --- file-system failures ---

@pytest.fixture
def locked_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory the test process cannot create files in: mode 0500 for a normal user; the
    immutable attribute for root (whom modes do not stop)."""
    d = tmp_path / "locked"
    d.mkdir()
    if IS_ROOT:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here")
        yield d
        subprocess.run(["chattr", "-i", str(d)], check=True)
    else:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)


def test_unwritable_directory_raises_store_error_with_os_reason(locked_dir: Path) -> None:
    with pytest.raises(StoreError) as info:
        Store(locked_dir / "store.db")
    assert not isinstance(info.value, StoreCorrupt)
    assert ("Permission denied" in str(info.value)) or ("Operation not permitted" in str(info.value))


def test_existing_store_in_unwritable_directory(tmp_path: Path) -> None:
    """The file is writable but its -wal cannot be created: SQLite's error plus the OS reason."""
    d = tmp_path / "data"
    with Store(d / "store.db") as s:
        s.apply_records([sliver("site_a")], [])
    if IS_ROOT:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here")
    else:
        d.chmod(0o500)
    try:
        with pytest.raises(StoreError) as info:
            Store(d / "store.db")
        assert ("Permission denied" in str(info.value)) or (
            "Operation not permitted" in str(info.value))
        assert quarantined(d / "store.db") == []
    finally:
        if IS_ROOT:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        else:
            d.chmod(0o700)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="mounting a file system needs root")
def test_read_only_file_system(small_tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(StoreError, match="Read-only file system"):
        Store(small_tmpfs / "store.db")


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="mounting a file system needs root")
def test_disk_full_raises_store_error_and_keeps_last_good_state(small_tmpfs: Path) -> None:
    with Store(small_tmpfs / "store.db") as s:
        s.apply_records([sliver("site_first")], [], {"gen": "1"})
        big = [sliver(f"site_s{i}", initscript="y" * 2000) for i in range(1000)]
        with pytest.raises(StoreError, match="full") as info:
            s.apply_records(big, [], {"gen": "2"})
        assert "No space left on device" in str(info.value)
        assert s.slivers() == {"site_first": sliver("site_first")}
        assert s.get_meta("gen") == "1"


def test_quarantine_keeps_the_wal_of_a_damaged_store(tmp_path: Path, db_path: Path) -> None:
    """The -wal may hold the last committed transactions: it must reach the quarantine intact
    (a read-write connection would delete it on close)."""
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    with Store(db_path) as s:
        s.apply_records([sliver(f"site_s{i}", initscript="x" * 400) for i in range(2000)], [])
    with Store(db_path) as s:
        s.apply_records([sliver("site_a")], [])
        # Copying the files while the store is open yields what kill -9 leaves: a live -wal.
        for suffix in ("", "-wal"):
            (crashed / f"store.db{suffix}").write_bytes(Path(f"{db_path}{suffix}").read_bytes())
    wal = (crashed / "store.db-wal").read_bytes()
    assert len(wal) > 0
    main = (crashed / "store.db").read_bytes()
    (crashed / "store.db").write_bytes(main[: len(main) // 2])
    with pytest.raises(StoreCorrupt):
        Store(crashed / "store.db")
    [moved] = quarantined(crashed / "store.db")
    assert Path(f"{moved}-wal").read_bytes() == wal
