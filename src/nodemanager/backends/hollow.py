"""The hollow backend: records only — no account, file or process is ever created.

It exists so the whole daemon (sync, workers, API, loans, tickets) can run unprivileged, and so
that many simulated nodes fit on one machine for scale tests. It makes no OS call at all and takes
no ``Host``. It says what it is: a warning at construction, and ``kind = "hollow"`` for ``status``.

Each "account" is an in-memory entry with the uid a real node would give it (``uid_base`` + the
slice id, as the account backend does: :mod:`.uids`) recording the keys, initscript and enabled flag last
configured and whether it was started. ``calls`` counts
calls per method, so a benchmark can assert that unchanged slivers cost no backend call.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..core.errors import AccountConflict, BackendError
from ..core.records import ObservedAccount, Sliver, validate_name
from .uids import sliver_uid

logger = logging.getLogger(__name__)

FIRST_UID = 100000


@dataclass(frozen=True, slots=True)
class HollowAccount:
    """What the hollow backend remembers of one sliver. ``version`` grows on every real change,
    so an idempotent call is visible as an unchanged version."""

    name: str
    uid: int
    keys: tuple[str, ...] = ()
    initscript: str = ""
    enabled: bool = True
    running: bool = False
    version: int = 0


class HollowBackend:
    kind = "hollow"

    def __init__(self, *, uid_base: int = FIRST_UID) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, HollowAccount] = {}
        self._holders: dict[int, str] = {}  # uid -> name: a create checks its uid in O(1)
        self.uid_base = uid_base
        self.calls: Counter[str] = Counter()
        logger.warning("hollow backend: records only, no accounts are created")

    def account(self, name: str) -> HollowAccount | None:
        """The recorded state of ``name`` (for tests and the simulator)."""
        with self._lock:
            return self._accounts.get(name)

    # --- Backend protocol -----------------------------------------------------------------
    def observe(self) -> dict[str, ObservedAccount]:
        with self._lock:
            self.calls["observe"] += 1
            return {n: ObservedAccount(n, a.uid, True) for n, a in self._accounts.items()}

    def lookup(self, name: str) -> ObservedAccount | None:
        with self._lock:
            self.calls["lookup"] += 1
            account = self._accounts.get(name)
        return None if account is None else ObservedAccount(name, account.uid, True)

    def create(self, sliver: Sliver) -> int:
        name = validate_name(sliver.name)
        with self._lock:
            self.calls["create"] += 1
            if name in self._accounts:
                raise AccountConflict(f"sliver {name}: account {name!r} already exists")
            uid = sliver_uid(name, sliver.slice_id, self.uid_base)
            holder = self._holders.get(uid)
            if holder is not None:
                raise AccountConflict(f"sliver {name}: uid {uid} (slice id {sliver.slice_id}) is taken by {holder}")
            self._accounts[name] = HollowAccount(name, uid)
            self._holders[uid] = name
        logger.info("sliver=%s event=created uid=%d backend=hollow", name, uid)
        return uid

    def configure(self, sliver: Sliver, rspec: Mapping[str, int]) -> str:
        """Records the keys, initscript and enabled flag; no access signature (returns "")."""
        enabled = rspec.get("nm_enabled", 1) != 0
        with self._lock:
            self.calls["configure"] += 1
            old = self._existing(sliver.name)
            new = replace(old, keys=tuple(sliver.keys) if enabled else (), initscript=sliver.initscript,
                          enabled=enabled, running=old.running and enabled)
            if new != old:
                self._accounts[sliver.name] = replace(new, version=old.version + 1)
        return ""

    def start(self, sliver: Sliver) -> None:
        with self._lock:
            self.calls["start"] += 1
            old = self._existing(sliver.name)
            if old.enabled and not old.running:
                self._accounts[sliver.name] = replace(old, running=True, version=old.version + 1)

    def stop(self, name: str) -> None:
        with self._lock:
            self.calls["stop"] += 1
            old = self._accounts.get(name)
            if old is not None and old.running:
                self._accounts[name] = replace(old, running=False, version=old.version + 1)

    def destroy(self, name: str) -> None:
        with self._lock:
            self.calls["destroy"] += 1
            removed = self._accounts.pop(name, None)
            if removed is not None:
                self._holders.pop(removed.uid, None)
        if removed is not None:
            logger.info("sliver=%s event=destroyed uid=%d backend=hollow", name, removed.uid)

    def is_running(self, name: str) -> bool:
        with self._lock:
            self.calls["is_running"] += 1
            account = self._accounts.get(name)
        return account is not None and account.running

    def _existing(self, name: str) -> HollowAccount:
        account = self._accounts.get(name)
        if account is None:
            raise BackendError(f"sliver {name}: account does not exist")
        return account
