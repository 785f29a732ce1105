"""Leases on reservable nodes, applied: the schedule kept in the store, and the thread that freezes
and thaws slivers at its boundaries (the meaning is :mod:`nodemanager.core.leases`).

* :class:`LeaseHandler` is a ``sync.DocumentHandler``: every merged document's
  ``reservation_policy``, ``lease_granularity`` and ``leases`` are validated into a schedule and
  written to the store's ``leases`` meta key (JSON), so boundaries are kept from the store after a
  restart and while the authority is unreachable. A newer document replaces the schedule whole:
  a lease that vanished from it ends at once (the handler wakes the scheduler).
* :class:`LeaseScheduler` is one thread. It wakes at the next boundary and at least every
  :data:`TICK_S` seconds, so a boundary is acted on within a second of it, and a clock step (NTP)
  -- seen as wall time moving differently from monotonic time between two wakes -- is
  re-evaluated at the next wake (logged ``event=clock-step``). At each wake it computes the
  slivers the schedule wants frozen now and acts on the *changes*: freezes the newcomers'
  cgroups (:class:`Freezer`, the cgroup freezer: processes kept, never killed) and locks their
  logins (:class:`LoginLock`), and thaws and unlocks the others. Acting on changes only (not
  re-freezing every tick) is what lets a Stop or Destroy of a frozen sliver work: its kill path
  thaws the group after SIGKILL, and the scheduler must not freeze it again under it.
* Logins: while frozen, the sliver's account is locked as ``nm_enabled = 0`` locks it (shadow
  ``!*`` and expired), so sshd refuses new key logins instead of placing them in a frozen group.
  ``SliverOperations`` asks :meth:`LeaseScheduler.is_frozen` when it configures an account, so a
  configure (e.g. the access drift the lock itself causes) keeps the lock instead of undoing it.
* The leased sliver's effective RSpec (CPU weight, HTB ceil and rate) is raised by the
  enforcement loop (``EnforcementLoop(lease_holder=...)``): the scheduler pokes it at each change.
* Starts asked for while a sliver is frozen are deferred by ``SliverOperations``
  (``start_pending``); after thawing and unlocking slivers the scheduler calls ``on_thawed`` with
  them, and the daemon queues their deferred starts on their workers (docs/leases.md).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from .clock import Clock
from .core.errors import NodeManagerError
from .core.leases import LeaseSchedule, is_system, schedule_from_members
from .core.records import Phase
from .core.rspec import rspec_from_attributes
from .datadir import Meta
from .store import Store

if TYPE_CHECKING:
    from .core.records import AuthorityDocument
    from .backends.account import AccountBackend
    from .enforce.set import EnforcementSet

logger = logging.getLogger(__name__)

#: The longest the scheduler sleeps: boundaries and clock steps are seen within this.
TICK_S = 0.5
#: A difference this large between the wall clock's and the monotonic clock's progress between
#: two wakes is a clock step.
STEP_THRESHOLD_S = 0.5
#: How long a freeze may wait for the kernel to report FROZEN (it keeps freezing afterwards).
FREEZE_WAIT_S = 0.1

_LIVE = (Phase.STOPPED, Phase.RUNNING, Phase.FAILED)


def load_schedule(store: Store) -> LeaseSchedule:
    """The schedule the newest merged document stated (none before any)."""
    text = store.get_meta(Meta.LEASES, "")
    try:
        return LeaseSchedule.from_dict(json.loads(text) if text else {})
    except ValueError:
        logger.error("event=lease-schedule-unreadable action=ignored")
        return LeaseSchedule()


def dump_schedule(schedule: LeaseSchedule) -> str:
    return json.dumps(schedule.to_dict(), separators=(",", ":"), sort_keys=True)


class LeaseHandler:
    """Persists each merged document's lease schedule (``sync.DocumentHandler``)."""

    name = "leases"

    def __init__(self, store: Store, on_change: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.on_change = on_change

    def apply(self, doc: AuthorityDocument) -> None:
        schedule, problems = schedule_from_members(doc.members)
        for problem in problems:
            logger.warning("event=lease-schedule-problem problem=%r", problem)
        text = dump_schedule(schedule)
        if text == self.store.get_meta(Meta.LEASES, ""):
            return
        for refused in schedule.refused:
            logger.warning("event=lease-refused lease=%s reason=%r", refused.label, refused.reason)
        self.store.set_meta({Meta.LEASES: text})
        logger.info("event=lease-schedule policy=%s granularity=%d leases=%d refused=%d", schedule.policy,
                    schedule.granularity, len(schedule.leases), len(schedule.refused))
        self.on_change()


class Freezer(Protocol):
    """Freezes a sliver's processes in place. Called from the scheduler's thread."""

    def freeze(self, account: str) -> bool:
        """Freeze the account's groups; False when there is nothing to freeze (no group or no
        freezer: try again later). Idempotent."""
        ...

    def thaw(self, account: str) -> None:
        """Thaw them (idempotent; nothing to thaw is fine)."""
        ...


class CgroupFreezer:
    """:class:`Freezer` over the enforcement's cgroup tree (v1 ``freezer.state``, v2
    ``cgroup.freeze``), the one ``enforce.tasks`` uses for stops."""

    def __init__(self, enforcement: EnforcementSet) -> None:
        self.enforcement = enforcement

    def freeze(self, account: str) -> bool:
        tree = self.enforcement.tree
        if tree is None or not tree.existing(account):
            return False
        return tree.freeze(account, FREEZE_WAIT_S) is not None

    def thaw(self, account: str) -> None:
        tree = self.enforcement.tree
        if tree is not None:
            tree.thaw(account)


class LoginLock(Protocol):
    def set_open(self, name: str, open_: bool) -> None:
        """Lock (``open_`` False) or unlock the sliver's logins. Idempotent; may raise
        ``NodeManagerError``."""
        ...


class AccountLoginLock:
    """:class:`LoginLock` through the account backend's shadow lock (as ``nm_enabled = 0``)."""

    def __init__(self, backend: AccountBackend) -> None:
        self.backend = backend

    def set_open(self, name: str, open_: bool) -> None:
        if self.backend.host.getpwnam(self.backend.account_name(name)) is None:
            return
        self.backend.db.ensure_lock_state(name, self.backend.account_name(name), open_)


class LeaseScheduler:
    """Applies the stored schedule at its boundaries (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        freezer: Freezer | None = None,
        logins: LoginLock | None = None,
        account_of: Callable[[str], str] = lambda name: name,
        on_lease_change: Callable[[], None] = lambda: None,
        on_thawed: Callable[[frozenset[str]], None] = lambda names: None,
        tick_s: float = TICK_S,
    ) -> None:
        """``on_thawed(names)``: called from the scheduler's thread after the slivers it froze or
        locked were released (thawed and unlocked) and the schedule no longer freezes them (the
        daemon starts what was deferred while they were frozen). Must be cheap; an exception it
        raises is logged."""
        self.store = store
        self.clock = clock
        self.freezer = freezer
        self.logins = logins
        self.account_of = account_of
        self.on_lease_change = on_lease_change
        self.on_thawed = on_thawed
        self.tick_s = tick_s
        self._schedule: LeaseSchedule | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The sliver holding the node now (the enforcement loop reads it), or None.
        self.holder: str | None = None
        #: Slivers whose groups this scheduler froze, and whose logins it locked.
        self.frozen: set[str] = set()
        self.locked: set[str] = set()
        #: Clock steps seen (tests, the log).
        self.steps = 0

    # --- reading the schedule -------------------------------------------------------------------
    def poke(self) -> None:
        """The stored schedule changed: re-read it and act at once. Any thread."""
        with self._lock:
            self._schedule = None
        self._wake.set()

    def schedule(self) -> LeaseSchedule:
        with self._lock:
            if self._schedule is None:
                self._schedule = load_schedule(self.store)
            return self._schedule

    def _slivers(self) -> dict[str, tuple[bool, bool]]:
        """name -> (system, enabled) of every sliver whose account exists."""
        accounts = self.store.accounts()
        found: dict[str, tuple[bool, bool]] = {}
        for name, record in self.store.slivers().items():
            state = accounts.get(name)
            if state is None or not state.owned or state.uid is None or state.phase not in _LIVE:
                continue
            found[name] = (is_system(record.attributes), rspec_from_attributes(record.attributes)["nm_enabled"] != 0)
        return found

    def wanted_frozen(self, now: float | None = None) -> frozenset[str]:
        """The slivers the schedule wants frozen at ``now`` (default: the clock's now). Asked by
        every sync cycle (the plan's deferred starts): on a node that is not reservable it reads
        no sliver."""
        schedule = self.schedule()
        if not schedule.reservable:
            return frozenset()
        t = self.clock.now() if now is None else now
        return schedule.frozen_at(t, {n: s for n, (s, _) in self._slivers().items()})

    def is_frozen(self, name: str) -> bool:
        """Whether the schedule wants sliver ``name`` frozen now (``SliverOperations`` asks when
        it configures the account: such a sliver stays locked). Cheap: one record lookup."""
        schedule = self.schedule()
        if not schedule.reservable:
            return False
        record = self.store.sliver(name)
        if record is None:
            return False
        return name in schedule.frozen_at(self.clock.now(), {name: is_system(record.attributes)})

    # --- acting ---------------------------------------------------------------------------------
    def tick(self) -> float | None:
        """Evaluate the schedule now and apply what changed; returns the seconds to the next
        boundary (None: none). Never raises: failures are logged and retried at the next tick."""
        now = self.clock.now()
        try:
            schedule = self.schedule()
            slivers = self._slivers()
        except NodeManagerError as exc:
            logger.error("event=lease-tick-failed error=%s", exc)
            return None
        lease = schedule.leased_at(now)
        holder = lease.name if lease is not None else None
        if holder != self.holder:
            if self.holder is not None:
                logger.info("event=lease-ended sliver=%s", self.holder)
            if lease is not None:
                logger.info("event=lease-started sliver=%s t_from=%d t_until=%d", lease.name, lease.t_from, lease.t_until)
            self.holder = holder
            try:
                self.on_lease_change()
            except Exception:  # noqa: BLE001 - a hook must not stop the schedule
                logger.exception("event=lease-hook-failed")
        wanted = schedule.frozen_at(now, {n: s for n, (s, _) in slivers.items()})
        self._apply(wanted, slivers)
        boundary = schedule.next_boundary(now)
        return None if boundary is None else boundary - now

    def _apply(self, wanted: frozenset[str], slivers: dict[str, tuple[bool, bool]]) -> None:
        gone = (self.frozen | self.locked) - set(slivers)
        self.frozen -= gone
        self.locked -= gone
        held = self.frozen | self.locked
        for name in sorted(wanted - self.locked):
            if self._set_open(name, False):
                self.locked.add(name)
        for name in sorted(wanted - self.frozen):
            if self.freezer is None:
                continue
            try:
                if self.freezer.freeze(self.account_of(name)):
                    self.frozen.add(name)
                    logger.info("event=lease-frozen sliver=%s", name)
            except NodeManagerError as exc:
                logger.error("event=lease-freeze-failed sliver=%s error=%s", name, exc)
        for name in sorted(self.frozen - wanted):
            if self.freezer is None:
                break
            try:
                self.freezer.thaw(self.account_of(name))
            except NodeManagerError as exc:
                logger.error("event=lease-thaw-failed sliver=%s error=%s", name, exc)
                continue
            self.frozen.discard(name)
            logger.info("event=lease-thawed sliver=%s", name)
        for name in sorted(self.locked - wanted):
            if self._set_open(name, slivers[name][1]):
                self.locked.discard(name)
        # after the unlock: a start there would be skipped on a locked account
        released = frozenset(held - self.frozen - self.locked)
        if released:
            try:
                self.on_thawed(released)
            except Exception:  # noqa: BLE001 - a hook must not stop the schedule
                logger.exception("event=lease-thawed-hook-failed")

    def _set_open(self, name: str, open_: bool) -> bool:
        if self.logins is None:
            return True
        try:
            self.logins.set_open(name, open_)
        except NodeManagerError as exc:
            logger.error("event=lease-login-%s-failed sliver=%s error=%s", "unlock" if open_ else "lock", name, exc)
            return False
        return True

    # --- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        last_wall, last_mono = self.clock.now(), self.clock.monotonic()
        while not self._stop.is_set():
            wall, mono = self.clock.now(), self.clock.monotonic()
            step = (wall - last_wall) - (mono - last_mono)
            if abs(step) > STEP_THRESHOLD_S:
                self.steps += 1
                logger.warning("event=clock-step seconds=%.1f action=schedule-re-evaluated", step)
            last_wall, last_mono = wall, mono
            try:
                left = self.tick()
            except Exception:  # noqa: BLE001 - nothing ends the schedule's thread
                logger.exception("event=lease-tick-failed")
                left = None
            timeout = self.tick_s if left is None else max(0.0, min(self.tick_s, left))
            self._wake.wait(timeout)
            self._wake.clear()

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread. Frozen slivers stay frozen: a restart keeps the schedule (see
        ``EnforcementSet.thaw_stops_cut_short``'s ``keep``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


def lease_holder(store: Store, now: float) -> str | None:
    """The sliver the stored schedule gives the node at ``now`` (``status --resources``)."""
    lease = load_schedule(store).leased_at(now)
    return None if lease is None else lease.name


def status_lines(store: Store, now: float, when: Callable[[float], str]) -> list[str]:
    """``status``: the policy, the current and next lease, what is frozen now and the refused
    leases with their reasons (nothing on a node that is not reservable and has no refusal)."""
    schedule = load_schedule(store)
    if not schedule.reservable and not schedule.refused:
        return []
    lines = [f"leases:         policy {schedule.policy}, granularity {schedule.granularity} s, "
             f"{len(schedule.leases)} accepted, {len(schedule.refused)} refused"]
    current, upcoming = schedule.leased_at(now), schedule.next_lease(now)
    if current is not None:
        lines.append(f"  current:      {current.name} until {when(current.t_until)}")
    elif schedule.reservable:
        idle = "every non-system sliver frozen" if schedule.policy == "lease_or_idle" else "slivers run as usual"
        lines.append(f"  current:      none ({idle})")
    if upcoming is not None:
        lines.append(f"  next:         {upcoming.name} from {when(upcoming.t_from)} until {when(upcoming.t_until)}")
    frozen = sorted(schedule.frozen_at(now, {n: is_system(s.attributes) for n, s in store.slivers().items()}))
    if frozen:
        shown = ", ".join(frozen[:10]) + (f" and {len(frozen) - 10} more" if len(frozen) > 10 else "")
        lines.append(f"  frozen now:   {shown}")
    for refused in schedule.refused[:10]:
        lines.append(f"  REFUSED:      {refused.label}: {refused.reason}")
    if len(schedule.refused) > 10:
        lines.append(f"  REFUSED:      ... and {len(schedule.refused) - 10} more (see the log)")
    return lines


class LeaseCollector:
    """Prometheus gauges read from the stored schedule at scrape time (``metrics``):
    ``nodemanager_lease_active{slice}`` (1 for the sliver holding the node; no series outside
    leases), ``nodemanager_lease_next_boundary_seconds`` (seconds to the next ``t_from`` or
    ``t_until``; no sample when none is scheduled) and ``nodemanager_leases_refused``."""

    def __init__(self, store: _MetaReader, now: Callable[[], float]) -> None:
        self._store = store
        self._now = now

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            text = self._store.get_meta(Meta.LEASES, "")
            schedule = LeaseSchedule.from_dict(json.loads(text) if text else {})
        except (NodeManagerError, ValueError):
            return
        now = self._now()
        active = GaugeMetricFamily("nodemanager_lease_active", "1 for the slice whose lease holds the node now",
                                   labels=["slice"])
        lease = schedule.leased_at(now)
        if lease is not None:
            active.add_metric([lease.name], 1.0)
        yield active
        boundary = GaugeMetricFamily("nodemanager_lease_next_boundary_seconds",
                                     "Seconds until the next lease boundary (start or end)")
        upcoming = schedule.next_boundary(now)
        if upcoming is not None:
            boundary.add_metric([], float(upcoming - now))
        yield boundary
        refused = GaugeMetricFamily("nodemanager_leases_refused", "Leases of the last document refused "
                                    "(overlapping, malformed or empty once rounded)")
        refused.add_metric([], float(len(schedule.refused)))
        yield refused


class _MetaReader(Protocol):
    def get_meta(self, key: str, default: str = "") -> str: ...
