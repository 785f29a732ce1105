"""Row <-> value conversion for the store: the SQL column lists, the upsert statements, and
how a :class:`~nodemanager.core.records.Sliver`, an
:class:`~nodemanager.core.records.AccountState` and a
:class:`~nodemanager.core.records.ValveState` become column values and back.

Kept apart from :mod:`nodemanager.store` (transactions, locking, caches) so the storage format is
read in one place. Conversions raise ``ValueError``, ``TypeError``, ``OverflowError``, ``KeyError``
or ``msgspec`` errors on a value that does not convert; the store turns those into ``StoreError``.
Pure functions, callable from any thread.
"""

from __future__ import annotations

import msgspec

from .core.bwbudget import Accounting
from .core.records import AccountState, Phase, Sliver, ValveState


def upsert(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT ... ON CONFLICT DO UPDATE`` on the first column (the key): unlike ``INSERT OR
    REPLACE`` it updates the row in place instead of deleting and re-inserting it."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
    marks = ", ".join("?" * len(columns))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
        f"ON CONFLICT ({columns[0]}) DO UPDATE SET {updates}"
    )


SLIVER_FIELDS = (
    "name", "slice_id", "instantiation", "expires", "timestamp", "source", "keys", "attributes",
    "initscript", "controller",
)
ACCOUNT_FIELDS = (
    "name", "uid", "owned", "applied", "phase", "failures", "last_error", "retry_at",
    "create_requested", "access", "start_pending",
)
SLIVER_COLUMNS = ", ".join(SLIVER_FIELDS)
ACCOUNT_COLUMNS = ", ".join(ACCOUNT_FIELDS)
UPSERT_SLIVER = upsert("slivers", SLIVER_FIELDS)
UPSERT_ACCOUNT = upsert("accounts", ACCOUNT_FIELDS)
UPSERT_META = upsert("meta", ("key", "value"))
UPSERT_MARK = upsert("ticket_marks", ("slice", "issued"))
BUDGET_FIELDS = ("name", "period_start", "used", "counter", "max_bytes", "thresh_bytes", "cap_kbit")
BUDGET_COLUMNS = ", ".join(BUDGET_FIELDS)
UPSERT_BUDGET = upsert("byte_budgets", BUDGET_FIELDS)

_encode = msgspec.json.Encoder().encode
_decode_keys = msgspec.json.Decoder(tuple[str, ...]).decode
_decode_attributes = msgspec.json.Decoder(tuple[tuple[str, str], ...]).decode
_decode_valve = msgspec.json.Decoder(dict[str, object]).decode


def sliver_row(s: Sliver) -> tuple[object, ...]:
    return (
        s.name, s.slice_id, s.instantiation, s.expires, s.timestamp, s.source,
        _encode(s.keys).decode(), _encode(s.attributes).decode(), s.initscript, s.controller,
    )


def sliver_from_row(row: tuple[object, ...]) -> Sliver:
    name, slice_id, inst, expires, stamp, source, keys, attrs, initscript, controller = row
    return Sliver(
        name, slice_id, inst, expires, stamp, source,  # type: ignore[arg-type]
        () if keys == "[]" else _decode_keys(keys),  # type: ignore[arg-type]
        () if attrs == "[]" else _decode_attributes(attrs),  # type: ignore[arg-type]
        initscript, controller,  # type: ignore[arg-type]
    )


def account_row(a: AccountState) -> tuple[object, ...]:
    return (
        a.name, a.uid, int(a.owned), a.applied, Phase(a.phase).value, a.failures, a.last_error,
        float(a.retry_at), int(a.create_requested), a.access, int(a.start_pending),
    )


def account_from_row(row: tuple[object, ...]) -> AccountState:
    name, uid, owned, applied, phase, failures, last_error, retry_at, create_requested, access, start_pending = row
    return AccountState(
        name, uid, bool(owned), applied, Phase(phase), failures,  # type: ignore[arg-type]
        last_error, retry_at, bool(create_requested), access, bool(start_pending),  # type: ignore[arg-type]
    )


def valve_text(valve: ValveState) -> str:
    """The ``meta`` value that stores ``valve``."""
    return _encode({"held": sorted(valve.held), "seen": valve.seen}).decode()


def valve_from_text(raw: str) -> ValveState:
    """The ``ValveState`` stored as ``raw`` (the empty one for ``""``). Raises
    ``msgspec.DecodeError``, ``KeyError`` or ``ValueError`` on a value that is not one."""
    if not raw:
        return ValveState()
    data = _decode_valve(raw)
    held, seen = data["held"], data["seen"]
    if not isinstance(held, list) or not all(isinstance(n, str) for n in held):
        raise ValueError("held is not a list of names")
    if not isinstance(seen, int) or isinstance(seen, bool):
        raise ValueError("seen is not an integer")
    return ValveState(held=frozenset(held), seen=seen)


def budget_row(a: Accounting) -> tuple[object, ...]:
    return (a.name, float(a.period_start), int(a.used), a.counter, int(a.max_bytes), int(a.thresh_bytes), a.cap_kbit)


def budget_from_row(row: tuple[object, ...]) -> Accounting:
    name, start, used, counter, max_bytes, thresh_bytes, cap_kbit = row
    if not isinstance(name, str) or not all(isinstance(v, int) for v in (used, max_bytes, thresh_bytes)):
        raise ValueError(f"byte budget row {row!r} is not one")
    return Accounting(name, float(start), used, counter, max_bytes, thresh_bytes, cap_kbit)  # type: ignore[arg-type]
