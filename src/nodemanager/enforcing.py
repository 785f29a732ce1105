"""Driving resource enforcement from the daemon: when, and for whom.

The enforcers (``enforce/``) know *how* to make an effective RSpec real; this module decides *when*
and feeds them the whole picture:

* ``EnforcementLoop`` is one thread. A ``poke()`` (records changed by a sync, loans changed by
  the API, a sliver created or destroyed) leads to an *incremental* pass: every sliver's
  effective RSpec is recomputed (the loan arithmetic of ``core.rspec``), compared with what was
  last applied, and only the enforcers whose inputs changed are called, for the slivers that
  changed (``EnforcementSet.apply_changes``); a burst of pokes is coalesced into one pass at most
  every ``min_interval_s``. Every ``reapply_s`` a *full* pass re-reads the kernel (drift repair).
  Every pass also sweeps away the cgroups of accounts the store no longer knows and refreshes
  the placement listener's uid map; between passes, processes are swept into their cgroups every
  ``place_s`` seconds (the safety net behind placement at once). The loop starts and stops the
  placement listener with itself. Nothing a pass raises ends the thread: it is logged and
  counted through ``on_error``.
* Enforcers name kernel objects (cgroups) after the *account* (``name_prefix`` + sliver), which is
  unique on the machine, not after the sliver: two node managers with different prefixes (tests,
  a hollow fleet beside a real one) never share a cgroup, and the sweep only touches groups named
  like this node's accounts. ``account_of`` maps one to the other.
* ``EnforcementHooks`` is what the account backend calls at points of an account's life: limits
  and placement the moment the account exists, the disk image before anything is written in a
  new home, the cgroups Start joins, Stop through the cgroup, and teardown before ``userdel``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .core.leases import lease_rspecs
from .core.bwbudget import apply_byte_caps, caps_of
from .core.records import Phase, Sliver, is_valid_name
from .core.rspec import effective_rspecs, rspec_from_attributes
from .enforce.set import EnforcementSet
from .store import Store

logger = logging.getLogger(__name__)

#: The least time between two incremental passes: a burst of pokes (SetLoans in a loop, a sync
#: touching many slivers) costs one pass per interval, not one per poke.
MIN_INTERVAL_S = 0.2


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


def effective_targets(store: Store, cap: int | None, leased: str | None = None
                      ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Effective RSpecs and uids of every sliver whose account exists (what enforcement applies);
    ``leased`` (the sliver holding the node under a lease) gets the node (``core.leases``)."""
    accounts = {
        name: state for name, state in store.accounts().items()
        if state.owned and state.uid is not None and state.phase in (Phase.STOPPED, Phase.RUNNING, Phase.FAILED)
    }
    own = {name: rspec_from_attributes(record.attributes, cap) for name, record in store.slivers().items()}
    effective = effective_rspecs(own, store.loans())
    rspecs = {name: effective[name] for name in accounts if name in effective}
    if leased is not None:
        rspecs = lease_rspecs(rspecs, leased, cap)
    rspecs = apply_byte_caps(rspecs, caps_of(store.byte_budgets()))  # daily byte budgets (bwmon)
    uids = {name: accounts[name].uid for name in rspecs}
    return rspecs, uids  # type: ignore[return-value]


class EnforcementHooks:
    """The account backend's hooks into enforcement (``backends.hooks.AccountHooks``).
    Called from worker threads, one call at a time per sliver."""

    def __init__(
        self,
        enforcement: EnforcementSet,
        node_cap_kbps: Callable[[], int | None],
        account_of: Callable[[str], str] = lambda name: name,
    ) -> None:
        self.enforcement = enforcement
        self.node_cap_kbps = node_cap_kbps
        self.account_of = account_of

    def account_created(self, sliver: Sliver, uid: int) -> None:
        """Groups with the sliver's own limits (loans follow with the next pass, which the
        creation pokes), and placement at once for ``uid``."""
        rspec = rspec_from_attributes(sliver.attributes, self.node_cap_kbps())
        self.enforcement.prepare_sliver(self.account_of(sliver.name), uid, rspec)

    def home_created(self, sliver: Sliver, uid: int, gid: int, home: Path) -> None:
        disk = self.enforcement.disk
        if disk is not None:
            quota = rspec_from_attributes(sliver.attributes, self.node_cap_kbps())["nm_disk_quota"]
            for note in disk.prepare_home(self.account_of(sliver.name), uid, gid, home, quota):
                logger.info("sliver=%s event=disk-note note=%r", sliver.name, note)

    def stop_processes(self, name: str, uid: int, grace: float) -> bool:
        return self.enforcement.stop_sliver(self.account_of(name), uid, grace)

    def start_cgroups(self, name: str) -> list[Path]:
        tree = self.enforcement.tree
        if tree is None:
            return []
        account = self.account_of(name)
        tree.ensure_parents()
        tree.ensure(account)
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
        account_prefix: str = "",
        on_error: Callable[[str], None] = lambda enforcer: None,
        reapply_s: float = 60.0,
        place_s: float = 5.0,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        lease_holder: Callable[[], str | None] = lambda: None,
    ) -> None:
        """``lease_holder()`` names the sliver holding the node under a lease (``leasing``).
        ``account_prefix`` (``slivers.name_prefix``) makes a sliver's account name, which
        kernel objects are named after; the sweep removes only groups named prefix + a valid
        sliver name, so another node manager's groups under the same parent are never touched."""
        self.enforcement = enforcement
        self.store = store
        self.home_of = home_of
        self.node_cap_kbps = node_cap_kbps
        self.account_prefix = account_prefix
        self.on_error = on_error
        self.reapply_s = reapply_s
        self.place_s = place_s
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.lease_holder = lease_holder
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dirty = True
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: Effective RSpecs last handed to the enforcers (``status --resources``, tests).
        self.applied: dict[str, dict[str, int]] = {}
        #: Passes run (full, incremental): for tests and the benchmark of coalescing.
        self.passes = {"full": 0, "incremental": 0}

    def poke(self) -> None:
        """Effective RSpecs may have changed: apply as soon as possible. Any thread."""
        with self._lock:
            self._dirty = True
        self._wake.set()

    def targets(self) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, Path]]:
        """Effective RSpecs, uids and homes of every sliver whose account exists, keyed by
        account name (what the enforcers name kernel objects after)."""
        rspecs, uids = effective_targets(self.store, self.node_cap_kbps(), self.lease_holder())
        key = self.account_of
        return ({key(n): r for n, r in rspecs.items()}, {key(n): u for n, u in uids.items()},
                {key(n): Path(self.home_of(n)) for n in rspecs})

    def _owned(self) -> tuple[set[str], dict[str, int]]:
        """Accounts of every owned state (creating and destroying included: the sweep's keep
        set), and the uids known of them (placement's map)."""
        owned = {name: state for name, state in self.store.accounts().items() if state.owned}
        keep = {self.account_of(name) for name in owned}
        uids = {self.account_of(name): s.uid for name, s in owned.items() if s.uid is not None and s.uid != 0}
        return keep, uids

    def account_of(self, name: str) -> str:
        """The account (and kernel-object) name of sliver ``name``."""
        return self.account_prefix + name

    def _is_ours(self, account: str) -> bool:
        return account.startswith(self.account_prefix) and is_valid_name(account[len(self.account_prefix):])

    def apply_now(self, *, full: bool = True) -> None:
        """One pass in the caller's thread: sweep, apply (everything, or what changed), refresh
        placement, place processes. Never raises: failures are logged and counted."""
        with self._lock:
            self._dirty = False
        self.passes["full" if full else "incremental"] += 1
        try:
            _, uids = self.enforcement.refresh(self._owned, self._is_ours)
            rspecs, applied_uids, homes = self.targets()
        except Exception:  # noqa: BLE001 - a pass never ends the loop
            logger.exception("event=enforcement-failed stage=prepare")
            self.on_error("other")
            return
        try:
            if full:
                self.enforcement.apply_all(rspecs, applied_uids, homes)
            else:
                called = self.enforcement.apply_changes(rspecs, applied_uids, homes)
                logger.debug("event=enforcement-pass enforcers=%s", ",".join(f"{k}:{v}" for k, v in called.items()))
        except Exception as exc:  # noqa: BLE001 - any failure is counted, the loop goes on
            logger.error("event=enforcement-failed error=%s", exc)
            for enforcer in self.enforcement.failed or ("other",):
                self.on_error(enforcer)
        self.applied = rspecs
        self._place(uids)

    def _place(self, uids: dict[str, int]) -> None:
        try:
            self.enforcement.place_processes(uids)
        except Exception as exc:  # noqa: BLE001
            logger.error("event=placement-failed error=%s", exc)
            self.on_error("placement")

    def _run(self) -> None:
        last_full = last_pass = float("-inf")
        last_place = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            with self._lock:
                dirty = self._dirty
            if now - last_full >= self.reapply_s:
                self.apply_now(full=True)
                last_full = last_pass = last_place = self.clock()
            elif dirty and now - last_pass >= self.min_interval_s:
                self.apply_now(full=False)
                last_pass = last_place = self.clock()
            elif now - last_place >= self.place_s:
                try:
                    self._place(self._owned()[1])
                except Exception:  # noqa: BLE001 - the store may be briefly unreadable
                    logger.exception("event=placement-failed")
                    self.on_error("placement")
                last_place = self.clock()
            now = self.clock()
            with self._lock:
                dirty = self._dirty
            waits = [last_full + self.reapply_s - now, last_place + self.place_s - now]
            if dirty:
                waits.append(last_pass + self.min_interval_s - now)
            timeout = max(0.0, min(waits))
            if dirty and timeout > 0:
                self._stop.wait(timeout)  # coalescing: later pokes join this pass
            elif timeout > 0:
                self._wake.wait(timeout)
            self._wake.clear()

    def start(self) -> None:
        """Start the placement listener (if any) and the loop's thread. Idempotent."""
        if self._thread is None:
            placement = self.enforcement.placement
            if placement is not None:
                placement.start()
            self._thread = threading.Thread(target=self._run, name="enforcement", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        placement = self.enforcement.placement
        if placement is not None:
            placement.stop()
