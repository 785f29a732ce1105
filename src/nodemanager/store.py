"""SQLite (WAL) store: sliver records, account states, loans, meta, ticket replay marks.

INTERFACE STUB — to be implemented (see the brief). Every public method is one transaction;
a ``kill -9`` at any instant leaves either the old or the new state, never a mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from .core.records import AccountState, Loan, Sliver, ValveState


class Store:
    def __init__(self, path: Path) -> None:
        """Open (creating if missing) the database at ``path``; migrate the schema.

        A file that is not a readable SQLite database of ours raises ``StoreCorrupt`` after the
        file has been moved aside (``path`` + ``.corrupt-<epoch>``); the caller decides what next.
        """
        raise NotImplementedError

    @classmethod
    def open_or_quarantine(cls, path: Path) -> tuple[Store, str | None]:
        """Open the store; if it is corrupt, quarantine it, start an empty one and return the
        reason as the second element (None when all was well)."""
        raise NotImplementedError

    def close(self) -> None: ...

    # --- sliver records (what the sources say) ---
    def slivers(self) -> dict[str, Sliver]: ...
    def sliver(self, name: str) -> Sliver | None: ...

    def apply_records(
        self,
        upserts: Iterable[Sliver],
        deletes: Iterable[str],
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Upsert and delete records and set meta keys in ONE transaction."""

    # --- account states (what the node made) ---
    def accounts(self) -> dict[str, AccountState]: ...
    def account(self, name: str) -> AccountState | None: ...
    def put_account(self, state: AccountState) -> None: ...
    def delete_account(self, name: str) -> None: ...

    def finish_destroy(self, name: str) -> None:
        """After a successful destroy: delete the account state, the record if it is expired or
        gone from its source, and the sliver's loans, in one transaction."""

    # --- loans ---
    def loans(self) -> dict[str, tuple[Loan, ...]]: ...
    def set_loans(self, lender: str, loans: Iterable[Loan]) -> None: ...

    # --- meta (key/value strings: last sync outcome, authority timestamp, valve) ---
    def get_meta(self, key: str, default: str = "") -> str: ...
    def set_meta(self, values: Mapping[str, str]) -> None: ...
    def valve(self) -> ValveState: ...
    def set_valve(self, valve: ValveState) -> None: ...

    # --- ticket replay marks (issue 4) ---
    def ticket_mark(self, slice_name: str) -> int | None: ...
    def set_ticket_mark(self, slice_name: str, issued: int) -> None: ...
