"""The enabled enforcers of one node, as one object the daemon drives.

``EnforcementSet.from_config`` builds the enforcers that ``[enforce]`` turns on as candidates,
touching nothing; :meth:`~EnforcementSet.probe` (at start) asks each whether its mechanism works
here and keeps those that do; the others become ``problems()``: one sentence each, logged at
start-up and shown by ``nodemanager status``, never silently ignored.

The task limit (``nm_pids_max``) has no ``[enforce]`` key of its own: it comes with the sliver
cgroups, i.e. whenever ``enforce.cpu`` or ``enforce.memory`` is on (when both are off the node
manager makes no cgroups at all) and the pids controller exists. It is what keeps a fork loop
from exhausting the node's pids, and what bounds the work of stopping one.

The enforcement loop (``enforcing.EnforcementLoop``) calls, from its one thread:

* ``apply_all(rspecs, uids, homes)``: every enforcer, reading the kernel (start-up, drift repair);
* ``apply_changes(rspecs, uids, homes)``: only the enforcers whose inputs changed since the last
  pass, for the slivers that changed (a loan of CPU touches two ``cpu.shares`` files, no tc);
* ``refresh(owned, is_ours)``: read the store's owned accounts, remove the cgroups of accounts
  it no longer knows (``sweep``) and set the placement listener's map (``update_placement``), all
  under the lock a worker's ``prepare_sliver`` takes: a keep set read before a sliver's groups
  were made would sweep them, killing its first processes;
* ``place_processes(uids)``: the periodic placement sweep (the listener's safety net).

The account backend's hooks (``enforcing.EnforcementHooks``) call, from worker threads:
``prepare_sliver`` (account made, nothing runs yet), ``stop_sliver`` (Stop, disable, Destroy) and
``remove_all`` (before ``userdel``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from ..config import Config
from ..core.errors import BackendError
from ..host import Host
from .bandwidth import BandwidthEnforcer
from .base import Enforcer, RSpecs
from .cgroups import CgroupTree
from .changes import Targets, changed_slivers
from .disk import DiskEnforcer
from .cpuset import CpusetEnforcer
from .limits import CpuEnforcer, MemoryEnforcer, PidsEnforcer
from .placement import PlacementListener, Target
from .tasks import kill_through_cgroup, stop_sliver, sweep

log = logging.getLogger(__name__)

_CGROUP_ENFORCERS = (CpuEnforcer, MemoryEnforcer, PidsEnforcer, CpusetEnforcer)


class EnforcementSet:
    def __init__(self, enforcers: list[Enforcer], *, tree: CgroupTree | None = None,
                 disk: DiskEnforcer | None = None, problems: list[str] | None = None,
                 candidates: list[Enforcer] | None = None, placement: PlacementListener | None = None) -> None:
        """``enforcers`` are in use at once; ``candidates`` only after :meth:`probe` finds
        that their mechanism works here (building a node must not touch the machine)."""
        self.enforcers = list(enforcers)
        self.tree = tree
        self.disk = disk
        #: The process-event listener (``start()``/``stop()``: the enforcement loop's), or None.
        self.placement = placement
        self._problems = list(problems or [])
        self._candidates = list(candidates or [])
        #: What each enforcer's last pass had to scale or cap (see :attr:`notes`).
        self._notes: dict[str, tuple[str, ...]] = {}
        #: Names of the enforcers whose last pass failed (for metrics).
        self.failed: tuple[str, ...] = ()
        self._applied: Targets | None = None
        self._redo: set[str] = set()
        self._lock = threading.Lock()
        #: Serialises what changes the kernel's enforcement state: a pass (the enforcement
        #: loop's thread) and one sliver's prepare/remove (a worker's). Each enforcer reads the
        #: kernel and then writes (tc, nft, cgroup files): two at once would act on a stale read,
        #: e.g. both deleting the same HTB class, and the second fail.
        self._enforcing = threading.RLock()
        self._registered: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: Config, host: Host, *, cgroup_group: str = "nodemanager",
                    nft_table: str = "nodemanager", cap_kbit: int | None = None) -> EnforcementSet:
        """The enforcers ``config.enforce`` enables, as candidates: :meth:`probe` keeps those
        that work on this machine and reports the rest by :meth:`problems`."""
        e = config.enforce
        candidates: list[Enforcer] = []
        problems: list[str] = []
        controllers = [c for c, on in (("cpu", e.cpu), ("memory", e.memory)) if on]
        tree = placement = None
        if controllers:
            cpuset = ["cpuset"] if e.cpu else []  # reserved cores (enforce.cpuset) come with enforce.cpu
            tree = CgroupTree(host, [*controllers, *cpuset, "pids", "freezer"], group=cgroup_group)
            candidates += [cls_(tree) for cls_ in _CGROUP_ENFORCERS if cls_.name in (*controllers, *cpuset, "pids")]
            placement = PlacementListener(host, tree)
        if e.bandwidth:
            candidates.append(BandwidthEnforcer(host, e.uplink, cap_kbit=cap_kbit, table=nft_table))
        disk = None
        if e.disk:
            disk = DiskEnforcer(host, Path(config.slivers.home_root), config.data_dir / "images")
            candidates.append(disk)
        for resource, on in (("cpu", e.cpu), ("memory", e.memory), ("bandwidth", e.bandwidth), ("disk", e.disk)):
            if not on:
                problems.append(f"{resource}: not enforced ([enforce] {resource} = false)")
        if not controllers:
            problems.append("pids: not enforced (it comes with the cgroups of [enforce] cpu or memory, both false)")
        return cls([], tree=tree, disk=disk, problems=problems, candidates=candidates, placement=placement)

    def probe(self) -> None:
        """Ask each candidate whether its mechanism works here (this prepares it: parent
        cgroups, the images directory), and whether process events reach us; keep what works,
        report the rest. Idempotent; called once the node starts."""
        candidates, self._candidates = self._candidates, []
        for enforcer in candidates:
            reason = enforcer.available()
            if reason is None:
                self.enforcers.append(enforcer)
            else:
                self._problems.append(f"{enforcer.name}: {reason}")
        if self.disk is not None and self.disk not in self.enforcers:
            self.disk = None
        if not self._cgroup_enforcers():
            self.tree = self.placement = None
        if candidates and self.placement is not None:
            self.placement.probe()
        for problem in self.problems():
            log.warning("event=enforcement_unavailable problem=%r", problem)

    def thaw_stops_cut_short(self, keep: Collection[str] = ()) -> list[str]:
        """At start, before any worker runs: a group of ours still frozen is a stop cut short by
        a crash (a group is frozen only inside a stop, ``enforce.tasks``). Thaw it, or the sliver
        -- and every login placed into its group -- stays frozen for ever; its processes resume,
        or die of the SIGKILL they were sent while frozen (v1). Groups in ``keep`` (slivers a
        lease schedule wants frozen, ``leasing``) stay frozen. Returns the groups thawed."""
        if self.tree is None:
            return []
        thawed = self.tree.thaw_all(skip=keep)
        for name in thawed:
            log.warning("event=frozen_group_thawed sliver=%s reason=stop-cut-short", name)
        return thawed

    def _cgroup_enforcers(self) -> list[CpuEnforcer | MemoryEnforcer | PidsEnforcer]:
        return [e for e in self.enforcers if isinstance(e, _CGROUP_ENFORCERS)]

    def set_node_cap(self, kbit: int | None) -> None:
        """The node's bandwidth cap from the latest authority document (None: no cap)."""
        for enforcer in self.enforcers:
            if isinstance(enforcer, BandwidthEnforcer):
                enforcer.set_node_cap(kbit)
                self._redo.add(enforcer.name)  # the root class changes even if no RSpec does

    def problems(self) -> list[str]:
        """Mechanisms that are off or unavailable, with reasons, plus the last apply's notes."""
        placement = [self.placement.problem] if self.placement is not None and self.placement.problem else []
        return self._problems + placement + list(self.notes)

    @property
    def notes(self) -> tuple[str, ...]:
        """What the enforcers had to scale or cap at their last pass (for the log and ``status``)."""
        return tuple(note for notes in self._notes.values() for note in notes)

    def describe(self) -> dict[str, str]:
        """resource -> mechanism in use (for ``status``)."""
        result: dict[str, str] = {}
        for enforcer in self.enforcers:
            if isinstance(enforcer, DiskEnforcer):
                result["disk"] = f"{enforcer.mechanism()} ({enforcer.images_dir if enforcer.mechanism() == 'image' else 'setquota'})"
            elif isinstance(enforcer, BandwidthEnforcer):
                result["bandwidth"] = f"htb on {enforcer.device()}, nft table inet {enforcer.table}"
            elif isinstance(enforcer, _CGROUP_ENFORCERS):
                result[enforcer.name] = enforcer.mechanism()
        if self.placement is not None:
            result["placement"] = ("periodic sweep only" if self.placement.problem
                                   else "at once on uid change (process events), periodic sweep as a safety net")
        return result

    # --- passes ---------------------------------------------------------------------------
    def apply_all(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> None:
        """Apply every enforcer to every sliver, reading the kernel; one failing does not stop
        the others. Raises one ``BackendError`` naming every failure at the end."""
        self._run_pass(Targets(rspecs, uids, homes or {}), full=True)

    def apply_changes(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> dict[str, str]:
        """Apply only what changed since the last pass: an enforcer none of whose inputs moved
        is not called; the cgroup enforcers write only the slivers that changed. Enforcers that
        failed last time (and bandwidth after a cap change) run in full. Returns
        enforcer -> "all" / "some" (what was called; the others were skipped)."""
        return self._run_pass(Targets(rspecs, uids, homes or {}), full=False)

    def _run_pass(self, targets: Targets, *, full: bool) -> dict[str, str]:
        with self._enforcing:
            return self._run_pass_locked(targets, full=full)

    def _run_pass_locked(self, targets: Targets, *, full: bool) -> dict[str, str]:
        # taken, not copied and cleared: a cap change (set_node_cap, another thread) marked
        # meanwhile lands in one set or the other, never between
        before, redo, self._redo = self._applied, self._redo, set()
        called: dict[str, str] = {}
        failures: list[tuple[str, str]] = []  # (enforcer, what went wrong)
        for enforcer in self.enforcers:
            names = None if full or before is None or enforcer.name in redo else \
                changed_slivers(enforcer.name, before, targets)
            if names is not None and not names:
                continue
            try:
                if names is not None and isinstance(enforcer, _CGROUP_ENFORCERS):
                    called[enforcer.name] = "some"
                    notes = enforcer.apply_some(targets.rspecs, names)
                else:
                    called[enforcer.name] = "all"
                    notes = enforcer.apply(targets.rspecs, targets.uids, targets.homes)
            except BackendError as exc:
                failures.append((enforcer.name, str(exc)))
                self._redo.add(enforcer.name)
                continue
            self._notes[enforcer.name] = tuple(notes)
            for note in notes:
                log.info("event=enforcement_note enforcer=%s note=%r", enforcer.name, note)
        self.failed = tuple(name for name, _ in failures)
        self._applied = targets
        if failures:
            raise BackendError("; ".join(f"{name}: {error}" for name, error in failures))
        return called

    # --- one sliver's cgroups ---------------------------------------------------------------
    def prepare_sliver(self, name: str, uid: int, rspec: Mapping[str, int]) -> None:
        """The account ``name`` exists and nothing runs as ``uid`` yet: create its groups
        with its limits (CPU weight, memory, tasks) and register the uid for placement at once.
        Raises ``BackendError`` when a limit cannot be written (the uid is registered anyway:
        better placed with some limits than with none)."""
        if self.tree is None:
            return
        failures: list[str] = []
        with self._enforcing:  # a sweep never sees the groups made but not yet registered
            try:
                self.tree.ensure_parents()
                self.tree.ensure(name)
            except BackendError as exc:
                raise BackendError(f"sliver {name}: cannot make its cgroups: {exc}") from exc
            for enforcer in self._cgroup_enforcers():
                try:
                    enforcer.prepare(name, rspec)
                except BackendError as exc:
                    failures.append(f"{enforcer.name}: {exc}")
            with self._lock:
                self._registered[name] = uid
            if self.placement is not None:
                self.placement.set_target(uid, self._target(name))
        if failures:
            raise BackendError(f"sliver {name}: " + "; ".join(failures))

    def stop_sliver(self, name: str, uid: int, grace: float) -> bool:
        """End every process of the sliver through its cgroups (``enforce.tasks``); False when
        there are no cgroups here (the caller stops the uid's processes by pid)."""
        if self.tree is None:
            return False
        stopped = stop_sliver(self.tree, name, uid, grace)
        if stopped.termed:
            log.info("event=stopped sliver=%s uid=%d processes=%d kill_rounds=%d",
                     name, uid, stopped.termed, stopped.kill_rounds)
        return True

    def remove_all(self, name: str, uid: int) -> None:
        """Remove the sliver from every enforcer: its processes are killed through the cgroup
        first (while placement still catches a late login), then it is forgotten by placement,
        then each enforcer removes its part."""
        failures: list[str] = []
        if self.tree is not None and self.tree.existing(name):
            try:
                kill_through_cgroup(self.tree, name, uid)
            except BackendError as exc:
                failures.append(f"processes: {exc}")
        self._forget(name)
        with self._enforcing:
            for enforcer in self.enforcers:
                try:
                    enforcer.remove(name, uid)
                except BackendError as exc:
                    failures.append(f"{enforcer.name}: {exc}")
        if failures:
            raise BackendError(f"sliver {name}: " + "; ".join(failures))

    def refresh(self, owned: Callable[[], tuple[set[str], dict[str, int]]],
                is_ours: Callable[[str], bool]) -> tuple[set[str], dict[str, int]]:
        """Read ``owned()`` (the accounts to keep, and their known uids: the store's), sweep
        what it does not keep and update placement's map, with no sliver prepared meanwhile.
        A worker records a sliver's intent in the store before making its groups, so the keep
        set read here either names the sliver or predates its groups. Returns what ``owned``
        gave."""
        with self._enforcing:
            keep, uids = owned()
            self.sweep(keep, is_ours)
            self.update_placement(uids, keep)
        return keep, uids

    def sweep(self, keep: Collection[str], is_ours: Callable[[str], bool] = lambda name: True) -> list[str]:
        """Remove what belongs to no sliver: the cgroups (every hierarchy) of accounts that
        ``is_ours`` but are not in ``keep`` (every account the store still has an owned state
        for, being created or destroyed included), emptied first, and their placement entries;
        and the disk images of accounts not in ``keep`` (``DiskEnforcer.sweep``: its images
        directory is this node's own). Bandwidth classes and nft entries need no sweep: they are
        planned from the live set at every pass. Returns the names whose cgroups were removed;
        failures are logged and retried at the next sweep."""
        keep = set(keep)
        with self._lock:
            gone = [n for n in self._registered if n not in keep and is_ours(n)]
        for name in gone:
            self._forget(name)
        with self._enforcing:
            if self.disk is not None:
                try:
                    self.disk.sweep(keep)
                except BackendError as exc:
                    log.warning("event=disk_sweep_failed error=%r", str(exc))
            return [] if self.tree is None else sweep(self.tree, keep, is_ours)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._registered.pop(name, None)
        if self.placement is not None:
            self.placement.forget(name)

    # --- placement ------------------------------------------------------------------------
    def _target(self, name: str) -> Target:
        """The sliver's ``cgroup.procs`` files, memory and pids first: the limits that matter in
        the first milliseconds of a login are how much it allocates and how much it forks."""
        tree = self.tree
        assert tree is not None
        first = [tree.hierarchy_for(c) for c in ("memory", "pids")]
        order = [h for h in first if h is not None] + [h for h in tree.used() if h not in first]
        return Target(name, tuple(tree.parent(h) / name / "cgroup.procs" for h in dict.fromkeys(order)))

    def update_placement(self, uids: Mapping[str, int], keep: Collection[str]) -> None:
        """The listener's map for this pass: ``uids`` (account -> uid, from the store) plus the
        accounts registered at creation that ``keep`` still holds (the store may not have
        their uid yet)."""
        if self.placement is None or self.tree is None:
            return
        with self._lock:
            self._registered = {n: u for n, u in self._registered.items() if n in keep}
            merged = {**self._registered, **uids}
        self.placement.set_targets({uid: self._target(name) for name, uid in merged.items()})

    def cgroups(self, name: str) -> list[Path]:
        """What ``Host.spawn_detached(cgroups=...)`` should join for this sliver."""
        return [] if self.tree is None else self.tree.dirs(name)

    def place_processes(self, uids: Mapping[str, int]) -> int:
        """Move every process of each sliver's uid into its cgroups; returns the moves made.
        The periodic safety net behind the placement listener."""
        if self.tree is None:
            return 0
        moved = self.tree.place(uids)
        if moved:
            log.info("event=processes_placed count=%d listener=%s", moved,
                     "on" if self.placement is not None and self.placement.running else "off")
        return moved

    def observed(self) -> dict[str, dict[str, int]]:
        merged: dict[str, dict[str, int]] = {}
        for enforcer in self.enforcers:
            try:
                found = enforcer.observed()
            except BackendError as exc:
                log.warning("event=observe_failed enforcer=%s error=%r", enforcer.name, str(exc))
                continue
            for name, values in found.items():
                merged.setdefault(name, {}).update(values)
        return merged
