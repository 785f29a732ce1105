"""Driving resource enforcement from the daemon: when, and for whom.

The enforcers (``enforce/``) know *how* to make an effective RSpec real; this module decides *when*
and feeds them the whole picture:

* ``EnforcementLoop`` is one thread. On ``poke()`` (records changed by a sync, loans changed by
  the API, a sliver created or destroyed) it recomputes every sliver's effective RSpec (the loan
  arithmetic of ``core.rspec``) and hands the full set to ``EnforcementSet.apply_all``, which diffs
  against the kernel; so ``SetLoans`` takes effect within a second, with no restart. Without
  pokes it re-applies every ``reapply_s`` (drift repair) and sweeps processes into their
  cgroups every ``place_s`` seconds, which is how SSH logins (sshd's session runs as the sliver's
  uid, without PAM involvement) end up in the sliver's cgroups.
* Enforcers name kernel objects (cgroups) after the *account* (``name_prefix`` + sliver), which is
  unique on the machine, not after the sliver: two node managers with different prefixes (tests,
  a hollow fleet beside a real one) never share a cgroup. ``account_of`` maps one to the other.
* ``EnforcementHooks`` is what the account backend calls at points of an account's life: mount
  the disk image before anything is written in a new home, give Start the cgroups to join, and
  tear everything down before ``userdel``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from .core.errors import NodeManagerError
from .core.records import Phase, Sliver
from .core.rspec import effective_rspecs, rspec_from_attributes
from .enforce.set import EnforcementSet
from .store import Store

logger = logging.getLogger(__name__)


def observed_by_sliver(
    enforcement: EnforcementSet, uids: dict[str, int], account_of: Callable[[str], str]
) -> dict[str, dict[str, int]]:
    """``enforcement.observed()`` keyed by sliver name: enforcers report accounts, or ``uid N``
    for objects they know only by uid; both map back to the sliver, merged."""
    back = {account_of(name): name for name in uids}
    back.update({f"uid {uid}": name for name, uid in uids.items()})
    merged: dict[str, dict[str, int]] = {}
    for key, values in enforcement.observed().items():
        merged.setdefault(back.get(key, key), {}).update(values)
    return merged


def effective_targets(store: Store, cap: int | None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Effective RSpecs and uids of every sliver whose account exists (what enforcement applies)."""
    accounts = {
        name: state for name, state in store.accounts().items()
        if state.owned and state.uid is not None and state.phase in (Phase.STOPPED, Phase.RUNNING, Phase.FAILED)
    }
    own = {name: rspec_from_attributes(record.attributes, cap) for name, record in store.slivers().items()}
    effective = effective_rspecs(own, store.loans())
    rspecs = {name: effective[name] for name in accounts if name in effective}
    uids = {name: accounts[name].uid for name in rspecs}
    return rspecs, uids  # type: ignore[return-value]


class EnforcementHooks:
    """The account backend's hooks into enforcement (``backends.account.AccountHooks``)."""

    def __init__(
        self,
        enforcement: EnforcementSet,
        node_cap_kbps: Callable[[], int | None],
        account_of: Callable[[str], str] = lambda name: name,
    ) -> None:
        self.enforcement = enforcement
        self.node_cap_kbps = node_cap_kbps
        self.account_of = account_of

    def home_created(self, sliver: Sliver, uid: int, gid: int, home: Path) -> None:
        disk = self.enforcement.disk
        if disk is not None:
            quota = rspec_from_attributes(sliver.attributes, self.node_cap_kbps())["nm_disk_quota"]
            for note in disk.prepare_home(self.account_of(sliver.name), uid, gid, home, quota):
                logger.info("sliver=%s event=disk-note note=%r", sliver.name, note)

    def start_cgroups(self, name: str) -> list[Path]:
        tree = self.enforcement.tree
        if tree is None:
            return []
        account = self.account_of(name)
        tree.ensure_parents()
        tree.ensure(account, tree.used())
        return self.enforcement.cgroups(account)

    def before_removal(self, name: str, uid: int) -> None:
        self.enforcement.remove_all(self.account_of(name), uid)


class EnforcementLoop:
    """One thread that keeps the kernel equal to the slivers' effective RSpecs."""

    def __init__(
        self,
        enforcement: EnforcementSet,
        store: Store,
        *,
        home_of: Callable[[str], Path],
        node_cap_kbps: Callable[[], int | None],
        account_of: Callable[[str], str] = lambda name: name,
        on_error: Callable[[str], None] = lambda enforcer: None,
        reapply_s: float = 60.0,
        place_s: float = 5.0,
    ) -> None:
        self.enforcement = enforcement
        self.store = store
        self.home_of = home_of
        self.node_cap_kbps = node_cap_kbps
        self.account_of = account_of
        self.on_error = on_error
        self.reapply_s = reapply_s
        self.place_s = place_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dirty = True
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: Effective RSpecs last handed to the enforcers (``status --resources``, tests).
        self.applied: dict[str, dict[str, int]] = {}

    def poke(self) -> None:
        """Effective RSpecs may have changed: apply as soon as possible. Any thread."""
        with self._lock:
            self._dirty = True
        self._wake.set()

    def targets(self) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, Path]]:
        """Effective RSpecs, uids and homes of every sliver whose account exists, keyed by
        account name (what the enforcers name kernel objects after)."""
        rspecs, uids = effective_targets(self.store, self.node_cap_kbps())
        key = self.account_of
        return ({key(n): r for n, r in rspecs.items()}, {key(n): u for n, u in uids.items()},
                {key(n): self.home_of(n) for n in rspecs})

    def _uids(self) -> dict[str, int]:
        return {
            self.account_of(name): state.uid for name, state in self.store.accounts().items()
            if state.owned and state.uid is not None and state.phase in (Phase.STOPPED, Phase.RUNNING)
        }

    def apply_now(self) -> None:
        """Apply the current effective RSpecs and sweep processes, in the caller's thread."""
        with self._lock:
            self._dirty = False
        rspecs, uids, homes = self.targets()
        try:
            self.enforcement.apply_all(rspecs, uids, homes)
        except NodeManagerError as exc:
            logger.error("event=enforcement-failed error=%s", exc)
            for enforcer in self.enforcement.failed or ("other",):
                self.on_error(enforcer)
        self.applied = rspecs
        self._place(uids)

    def _place(self, uids: dict[str, int]) -> None:
        try:
            self.enforcement.place_processes(uids)
        except NodeManagerError as exc:
            logger.error("event=placement-failed error=%s", exc)
            self.on_error("cpu")

    def _run(self) -> None:
        since_apply = self.reapply_s  # apply at once on start
        while not self._stop.is_set():
            with self._lock:
                dirty = self._dirty
            if dirty or since_apply >= self.reapply_s:
                self.apply_now()
                since_apply = 0.0
            else:
                self._place(self._uids())
            woke = self._wake.wait(self.place_s)
            self._wake.clear()
            if not woke:
                since_apply += self.place_s

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="enforcement", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
