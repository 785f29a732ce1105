"""The enabled enforcers of one node, as one object the daemon drives.

``EnforcementSet.from_config`` builds the enforcers that ``[enforce]`` turns on, asks each whether
its mechanism works here, and keeps only those that do; the others become ``problems()``: one
sentence each, logged at start-up and shown by ``nodemanager status``, never silently ignored.

The daemon calls, from its one enforcement thread:

* ``apply_all(rspecs, uids, homes)`` whenever effective RSpecs change (records, loans) and at
  start-up: enforcement follows ``SetLoans`` within one loop turn, with no restart;
* ``place_processes(uids)`` every few seconds: the PAM-free login mechanism (see
  ``enforce.cgroups``);
* ``remove_all(name, uid)`` on Destroy, before the account is deleted; the disk part is
  ``disk.release_home``, which must come before ``userdel --remove``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ..config import Config
from ..core.errors import BackendError
from ..host import Host
from .bandwidth import BandwidthEnforcer
from .base import Enforcer, RSpecs
from .cgroups import CgroupTree, CpuEnforcer, MemoryEnforcer
from .disk import DiskEnforcer

log = logging.getLogger(__name__)


class EnforcementSet:
    def __init__(self, enforcers: list[Enforcer], *, tree: CgroupTree | None = None,
                 disk: DiskEnforcer | None = None, problems: list[str] | None = None,
                 candidates: list[Enforcer] | None = None) -> None:
        """``enforcers`` are in use at once; ``candidates`` only after :meth:`probe` finds
        that their mechanism works here (building a node must not touch the machine)."""
        self.enforcers = list(enforcers)
        self.tree = tree
        self.disk = disk
        self._problems = list(problems or [])
        self._candidates = list(candidates or [])
        self.notes: tuple[str, ...] = ()
        #: Names of the enforcers whose last ``apply_all`` failed (for metrics).
        self.failed: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config, host: Host, *, cgroup_group: str = "nodemanager",
                    nft_table: str = "nodemanager", cap_kbit: int | None = None) -> EnforcementSet:
        """The enforcers ``config.enforce`` enables, as candidates: :meth:`probe` keeps those
        that work on this machine and reports the rest by :meth:`problems`."""
        e = config.enforce
        candidates: list[Enforcer] = []
        problems: list[str] = []
        controllers = [c for c, on in (("cpu", e.cpu), ("memory", e.memory)) if on]
        tree = None
        if controllers:
            try:
                tree = CgroupTree(host, controllers, group=cgroup_group)
            except BackendError as exc:
                problems.append(f"cpu/memory: cannot read the cgroup hierarchies: {exc}")
            else:
                if e.cpu:
                    candidates.append(CpuEnforcer(tree))
                if e.memory:
                    candidates.append(MemoryEnforcer(tree))
        if e.bandwidth:
            candidates.append(BandwidthEnforcer(host, e.uplink, cap_kbit=cap_kbit, table=nft_table))
        disk = None
        if e.disk:
            disk = DiskEnforcer(host, Path(config.slivers.home_root), config.data_dir / "images")
            candidates.append(disk)
        for resource, on in (("cpu", e.cpu), ("memory", e.memory), ("bandwidth", e.bandwidth), ("disk", e.disk)):
            if not on:
                problems.append(f"{resource}: not enforced ([enforce] {resource} = false)")
        return cls([], tree=tree, disk=disk, problems=problems, candidates=candidates)

    def probe(self) -> None:
        """Ask each candidate whether its mechanism works here (this prepares it: parent
        cgroups, the images directory); keep those that do, report the others. Idempotent;
        called once the node starts."""
        candidates, self._candidates = self._candidates, []
        for enforcer in candidates:
            reason = enforcer.available()
            if reason is None:
                self.enforcers.append(enforcer)
            else:
                self._problems.append(f"{enforcer.name}: {reason}")
        if self.disk is not None and self.disk not in self.enforcers:
            self.disk = None
        if not any(x.name in ("cpu", "memory") for x in self.enforcers):
            self.tree = None
        for problem in self._problems:
            log.warning("event=enforcement_unavailable problem=%r", problem)

    def set_node_cap(self, kbit: int | None) -> None:
        """The node's bandwidth cap from the latest authority document (None: no cap)."""
        for enforcer in self.enforcers:
            if isinstance(enforcer, BandwidthEnforcer):
                enforcer.set_node_cap(kbit)

    def problems(self) -> list[str]:
        """Mechanisms that are off or unavailable, with reasons, plus the last apply's notes."""
        return self._problems + list(self.notes)

    def describe(self) -> dict[str, str]:
        """resource -> mechanism in use (for ``status``)."""
        result: dict[str, str] = {}
        for enforcer in self.enforcers:
            if isinstance(enforcer, DiskEnforcer):
                result["disk"] = f"{enforcer.mechanism()} ({enforcer.images_dir if enforcer.mechanism() == 'image' else 'setquota'})"
            elif isinstance(enforcer, BandwidthEnforcer):
                result["bandwidth"] = f"htb on {enforcer.device()}, nft table inet {enforcer.table}"
            elif isinstance(enforcer, (CpuEnforcer, MemoryEnforcer)):
                h = enforcer.tree.hierarchy_for(enforcer.name)
                result[enforcer.name] = f"cgroup v{h.version} at {h.mount}" if h else "none"
        return result

    def apply_all(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> None:
        """Apply every enforcer; one failing does not stop the others. Raises one
        ``BackendError`` naming every failure at the end."""
        notes: list[str] = []
        failures: list[str] = []
        for enforcer in self.enforcers:
            try:
                notes += enforcer.apply(rspecs, uids, homes)
            except BackendError as exc:
                failures.append(f"{enforcer.name}: {exc}")
        self.notes = tuple(notes)
        self.failed = tuple(failure.split(":", 1)[0] for failure in failures)
        for note in notes:
            log.info("event=enforcement_note note=%r", note)
        if failures:
            raise BackendError("; ".join(failures))

    def remove_all(self, name: str, uid: int) -> None:
        """Remove the sliver from every enforcer (processes killed first, then the rest)."""
        failures: list[str] = []
        for enforcer in self.enforcers:
            try:
                enforcer.remove(name, uid)
            except BackendError as exc:
                failures.append(f"{enforcer.name}: {exc}")
        if failures:
            raise BackendError(f"sliver {name}: " + "; ".join(failures))

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

    def cgroups(self, name: str) -> list[Path]:
        """What ``Host.spawn_detached(cgroups=...)`` should join for this sliver (the groups
        exist once ``apply_all`` has run with the sliver)."""
        return [] if self.tree is None else self.tree.dirs(name)

    def place_processes(self, uids: Mapping[str, int]) -> int:
        """Move every process of each sliver's uid into its cgroups; returns the moves made."""
        if self.tree is None:
            return 0
        moved = self.tree.place(uids)
        if moved:
            log.info("event=processes_placed count=%d", moved)
        return moved
