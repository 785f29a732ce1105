"""The Backend port: what the workers may do to the machine for one sliver.

A backend knows nothing of the store, the authority or the plan: it is handed a ``Sliver`` (and
the effective RSpec where relevant) and makes the machine match. Every method is idempotent, so
a retried or repeated call after a crash converges instead of failing. Workers call a backend
from pool threads, never two calls for the same sliver at once; calls for different slivers may
run concurrently, so implementations guard any shared state themselves.

Account names are ``name_prefix + sliver name``; the backend applies the prefix, every other layer
speaks sliver names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from ..core.records import ObservedAccount, Sliver


class Backend(Protocol):
    #: "account" or "hollow": shown by ``status`` and logged at start-up.
    kind: str

    def observe(self) -> dict[str, ObservedAccount]:
        """All sliver-like accounts on the machine, keyed by sliver name, in one cheap pass
        (one read each of the password and shadow databases and one listing of the keys
        directory: no per-sliver calls), with each account's access signature. Thread-safe."""
        ...

    def lookup(self, name: str) -> ObservedAccount | None:
        """The account for ``name`` if it exists (whoever created it), else None. Thread-safe."""
        ...

    def create(self, sliver: Sliver) -> int:
        """Create the account, its group and home, and return its uid.

        Raises ``AccountConflict`` when an account of that name already exists: the caller decides
        beforehand (from the store) whether an existing account is its own, and calls
        ``configure`` for those. Raises ``BackendError`` on any other failure, after undoing a
        half-made account."""
        ...

    def configure(self, sliver: Sliver, rspec: Mapping[str, int]) -> str:
        """Make keys, start scripts and the enabled flag match ``sliver``. Idempotent.

        What decides access is done first (lock state, stopping a disabled sliver, the
        authoritative keys), so nothing the sliver did to its home can keep it enabled. Returns
        the account's access signature afterwards (as ``observe`` reports it; "" for backends
        that have none), which the caller records to detect later changes."""
        ...

    def start(self, sliver: Sliver) -> None:
        """Run the sliver's initscript and ``~/.nodemanager/start.d/*`` as the sliver user,
        detached, output to a log in its home. Idempotent enough to call on a running sliver."""
        ...

    def stop(self, name: str) -> None:
        """End every process of the sliver: TERM, then KILL after the grace period, repeated
        until none is left. Idempotent (no process: nothing to do)."""
        ...

    def destroy(self, name: str) -> None:
        """Stop, then remove the account, its group and home. Only ever called for accounts the
        node manager created. Idempotent (an absent account is success)."""
        ...

    def is_running(self, name: str) -> bool:
        """True when the sliver has at least one process."""
        ...
