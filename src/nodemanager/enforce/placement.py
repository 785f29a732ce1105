"""Placement at once: a process that takes a sliver's uid is in the sliver's cgroups before it
can allocate or fork much.

Logins, cron and at jobs do not go through the node manager: sshd (without PAM involvement),
crond and atd fork as root and then change their uid. The kernel reports each such change on its
process-event connector (``cn_proc``, the mechanism libcgroup's cgrulesengd uses for the same
job); one thread here listens and writes the process into the sliver's groups the moment its
real uid becomes a sliver's. Measured on this project's machine: see
``bench/placement_bench.py`` (METRIC ``placement_ms_p99``).

Details that matter:

* The *real* uid decides. sshd's privileged monitor (root) briefly sets only its effective uid
  to the user's to read key files; placing on the effective uid would move the monitor into the
  sliver. A login's session process sets all its uids, so its real uid changes.
* A process may fork between its uid change and our write; the child would then stay outside.
  So forks of a process placed in the last :data:`RECENT_S` seconds are placed too (the kernel
  reports forks as well).
* The kernel drops events when our receive queue overflows: the listener then runs a placement
  sweep of its own at once (``CgroupTree.place``) instead of trusting it saw everything.
* The connector works only in the initial network namespace and with CAP_NET_ADMIN; where it
  cannot be used, :meth:`PlacementListener.probe` says why and the periodic sweep of the
  enforcement loop (every few seconds) is what places processes: reported as an enforcement
  problem, never silent.

Who feeds the uid -> groups map: ``EnforcementSet.prepare_sliver`` when an account is created
(before anything runs as its uid) and every enforcement pass (``EnforcementSet.update_placement``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..core.errors import BackendError
from ..host import Host
from .cgroups import CgroupTree
from .procevents import (
    PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN,
    WANTED,
    Fork,
    UidChange,
    acknowledges,
    parse,
    subscription,
)

log = logging.getLogger(__name__)

#: How problems() words a listener that cannot run.
UNAVAILABLE = "placement: periodic sweep only: "
#: Forks of a process placed this recently are placed too.
RECENT_S = 2.0
#: Wait for the kernel's acknowledgement of a subscription.
ACK_TIMEOUT = 1.0
#: How often the listening thread checks whether it should stop.
RECV_POLL = 0.25
_RECENT_MAX = 4096


class EventChannel(Protocol):
    """What ``Host.open_proc_events`` returns (real: ``hostprocs.ProcEventChannel``)."""

    LOST: bytes

    def send(self, message: bytes) -> None: ...

    def recv(self, timeout: float) -> bytes | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where a uid's processes go: the sliver (for logs) and its groups' ``cgroup.procs``."""

    name: str
    procs: tuple[Path, ...]


class PlacementListener:
    """Listens to uid changes and forks in one thread; see the module docstring.

    ``start``/``stop`` from the daemon's thread; the map methods from any thread."""

    def __init__(self, host: Host, tree: CgroupTree) -> None:
        self.host = host
        self.tree = tree
        self._targets: dict[int, Target] = {}
        self._recent: dict[int, tuple[Target, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: EventChannel | None = None
        #: Why the listener cannot run here (``problems()`` wording), or None.
        self.problem: str | None = None
        #: Counters: processes placed, times events were lost, events that failed to handle.
        self.placed = 0
        self.lost = 0
        self.errors = 0

    # --- the uid -> groups map ------------------------------------------------------------
    def set_target(self, uid: int, target: Target) -> None:
        with self._lock:
            self._targets[uid] = target

    def set_targets(self, targets: Mapping[int, Target]) -> None:
        """Replace the whole map (an enforcement pass)."""
        with self._lock:
            self._targets = dict(targets)

    def forget(self, name: str) -> None:
        with self._lock:
            self._targets = {uid: t for uid, t in self._targets.items() if t.name != name}

    def targets(self) -> dict[int, Target]:
        with self._lock:
            return dict(self._targets)

    # --- the channel ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def probe(self) -> str | None:
        """None when process events reach us here; else the problem (also kept in
        :attr:`problem`). Subscribes and unsubscribes again; idempotent."""
        try:
            channel = self._subscribe()
        except BackendError as exc:
            self.problem = f"{UNAVAILABLE}{exc}"
            return self.problem
        self._unsubscribe(channel)
        self.problem = None
        return None

    def start(self) -> bool:
        """Subscribe and start listening; False (with :attr:`problem` set and logged) when
        the connector cannot be used. Idempotent."""
        if self.running:
            return True
        try:
            self._channel = self._subscribe()
        except BackendError as exc:
            self.problem = f"{UNAVAILABLE}{exc}"
            log.warning("event=placement_unavailable problem=%r", self.problem)
            return False
        self.problem = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="placement", daemon=True)
        self._thread.start()
        log.info("event=placement_listening")
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._channel is not None:
            self._unsubscribe(self._channel)
            self._channel = None

    def _subscribe(self) -> EventChannel:
        """Subscribe in the plain form and wait for the acknowledgement (which proves events
        reach us), then ask for the filter: a kernel that filters no longer sends the
        acknowledgement (it is an event of its own kind), and one that cannot ignores the
        request; either way the events we need keep coming."""
        channel: EventChannel = self.host.open_proc_events()
        try:
            tag = secrets.randbelow(1 << 31)
            channel.send(subscription(PROC_CN_MCAST_LISTEN, tag, events=None))
            if not self._acknowledged(channel, tag, ACK_TIMEOUT):
                raise BackendError("the process-event connector does not acknowledge a subscription")
            channel.send(subscription(PROC_CN_MCAST_LISTEN, tag + 1, events=WANTED))
        except BackendError:
            channel.close()
            raise
        return channel

    def _acknowledged(self, channel: EventChannel, tag: int, timeout: float) -> bool:
        """Wait (in real time: the channel blocks in real time) for the acknowledgement."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = channel.recv(min(left, RECV_POLL))
            if message and acknowledges(parse(message), tag):
                return True
            if message:
                self.handle(message)  # a real event already: do not lose it
        return False

    def _unsubscribe(self, channel: EventChannel) -> None:
        try:
            channel.send(subscription(PROC_CN_MCAST_IGNORE, 0, events=None))
        except BackendError as exc:
            log.debug("event=placement_unsubscribe_failed error=%r", str(exc))
        finally:
            channel.close()

    def _run(self) -> None:
        channel = self._channel
        assert channel is not None
        while not self._stop.is_set():
            try:
                message = channel.recv(RECV_POLL)
            except BackendError as exc:
                if not self._stop.is_set():
                    self.problem = f"{UNAVAILABLE}listener ended: {exc}"
                    log.error("event=placement_failed error=%r", str(exc))
                return
            if message is None:
                continue
            if message == channel.LOST:
                self.lost += 1
                log.warning("event=placement_events_lost action=sweep")
                self._catch_up()
                continue
            try:
                self.handle(message)
            except Exception:  # noqa: BLE001 - one bad event must not end placement
                self.errors += 1
                log.exception("event=placement_event_failed")

    # --- events ---------------------------------------------------------------------------
    def handle(self, message: bytes) -> int:
        """Act on one connector message; returns the group writes made. (The listening thread
        calls it; tests call it directly.)"""
        event = parse(message)
        if isinstance(event, UidChange):
            with self._lock:
                target = self._targets.get(event.ruid)
            if target is None:
                return 0
            self._remember(event.tgid, target, self.host.monotonic())
            return self._place(event.tgid, target)
        if isinstance(event, Fork) and event.child_pid == event.child_tgid:
            recent = self._recent.get(event.parent_tgid)
            if recent is None or self.host.monotonic() - recent[1] > RECENT_S:
                return 0
            self._remember(event.child_tgid, *recent)
            return self._place(event.child_tgid, recent[0])
        return 0

    def _catch_up(self) -> None:
        """After lost events: place every process of every target uid now."""
        try:
            self.tree.place({target.name: uid for uid, target in self.targets().items()})
        except BackendError as exc:
            log.error("event=placement_sweep_failed error=%r", str(exc))

    def _remember(self, tgid: int, target: Target, since: float) -> None:
        if len(self._recent) >= _RECENT_MAX:
            now = self.host.monotonic()
            self._recent = {p: r for p, r in self._recent.items() if now - r[1] <= RECENT_S}
        self._recent[tgid] = (target, since)

    def _place(self, tgid: int, target: Target) -> int:
        written = 0
        for procs in target.procs:
            try:
                self.host.write_text(procs, str(tgid))
                written += 1
            except BackendError as exc:  # the process exited, or the group is going away
                log.debug("event=place_failed sliver=%s pid=%d error=%r", target.name, tgid, str(exc))
        if written:
            self.placed += 1
        return written
