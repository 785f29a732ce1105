"""Reserved cores (``nm_cpu_cores``, PLC's ``cpu_cores``) through the cpuset controller.

The decision is ``core.cores.allocate_cores``: a sliver with ``N`` cores has a cpuset of N CPUs
no other managed sliver's cpuset holds (``Nb``: those plus the shared pool); every other sliver
group under our parent, slivers being created included, holds the shared pool (the allowed CPUs
minus every reserved one, never empty). Only managed slivers are constrained: system processes
and root stay in the root cpuset and may still run on a reserved core (docs/cores.md).

Files. v1: ``cpuset.cpus`` and ``cpuset.mems`` of the parent (``nodemanager``) and of each
sliver group; a v1 group with either blank refuses every task, so ``CgroupTree.ensure`` gives a
new group its parent's and :meth:`CpusetEnforcer.prepare` narrows a new sliver to the shared
pool before its first process joins. v2: ``cpuset.cpus`` of each sliver group (the parent
inherits; ``+cpuset`` is enabled by ``CgroupTree.ensure_parents``). The allowed CPUs are the
hierarchy root's effective CPUs (online CPUs within the node manager's own cpuset).

One sliver's change can move everyone's cpuset (the shared pool shrinks or grows), so every call
recomputes the whole allocation; an incremental call writes only the groups whose CPUs differ
from what this enforcer last wrote. A core that moves is first taken from its old holder, then
given (two steps): a sliver never gains a core while another still holds it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from ..core.cores import CoreAllocation, CoreRequest, allocate_cores, exclusive_cores, format_cpu_list, parse_cpu_list
from ..core.errors import BackendError
from .base import RSpecs
from .cgroups import CgroupTree, Hierarchy
from .limits import _ControllerEnforcer

#: Where the node's CPUs are listed when the cpuset files do not say.
ONLINE_FILE = Path("/sys/devices/system/cpu/online")


def core_requests(rspecs: RSpecs) -> dict[str, CoreRequest]:
    """The slivers of ``rspecs`` that ask for reserved cores."""
    return {name: CoreRequest(r.get("nm_cpu_cores", 0), bool(r.get("nm_cpu_cores_besteffort", 0)))
            for name, r in rspecs.items() if r.get("nm_cpu_cores", 0) > 0}


class CpusetEnforcer(_ControllerEnforcer):
    """``nm_cpu_cores``/``nm_cpu_cores_besteffort`` as the sliver groups' ``cpuset.cpus``."""

    name = "cpuset"

    def __init__(self, tree: CgroupTree) -> None:
        super().__init__(tree)
        #: reserved cores of the last allocation (None: read them from the kernel), the shared
        #: pool, and the CPU lists written by the last pass (empty: read the kernel).
        self._reserved: Mapping[str, tuple[int, ...]] | None = None
        self._shared: tuple[int, ...] | None = None
        self._written: dict[str, tuple[int, ...]] = {}
        #: the last allocation (``status``, tests)
        self.allocation: CoreAllocation | None = None

    def _where(self) -> tuple[Hierarchy, str] | None:
        h = self.tree.hierarchy_for("cpuset")
        return None if h is None else (h, "cpuset.cpus")

    # --- reading --------------------------------------------------------------------------
    def _list(self, path: Path) -> tuple[int, ...] | None:
        text = self.tree.read(path)
        if not text:
            return None
        try:
            return parse_cpu_list(text)
        except ValueError:
            return None

    def allowed(self, h: Hierarchy) -> tuple[int, ...]:
        """The CPUs the slivers may use: the hierarchy root's effective CPUs."""
        names = ("cpuset.effective_cpus", "cpuset.cpus") if h.version == 1 else ("cpuset.cpus.effective",)
        for path in [h.mount / n for n in names] + [ONLINE_FILE]:
            found = self._list(path)
            if found:
                return found
        raise BackendError(f"cannot tell the node's CPUs (none of {h.mount}'s cpuset files nor {ONLINE_FILE})")

    def _current(self, h: Hierarchy, names: Collection[str]) -> dict[str, tuple[int, ...]]:
        return {name: self._list(self.tree.parent(h) / name / "cpuset.cpus") or () for name in names}

    def _held(self, h: Hierarchy, children: list[str]) -> Mapping[str, tuple[int, ...]]:
        if self._reserved is None:
            self._reserved = exclusive_cores(self._current(h, children))
        return self._reserved

    # --- writing --------------------------------------------------------------------------
    def prepare(self, name: str, rspec: Mapping[str, int]) -> None:
        """A new sliver's group, before its first process: the shared pool (and on v1 the
        parent's memory nodes). Its own reserved cores come with the next pass."""
        where = self._where()
        if where is None:
            return
        h, _ = where
        self.tree.ensure(name, [h])
        shared = self._shared
        if shared is None:
            others = [c for c in self.tree.children(h) if c != name]
            held = self._held(h, others)
            shared = tuple(c for c in self.allowed(h) if not any(c in cores for cores in held.values()))
        self._write(h, name, shared)

    def apply(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> tuple[str, ...]:
        self.tree.ensure_parents()
        self._reserved, self._written = None, {}
        return self.apply_some(rspecs, rspecs)

    def apply_some(self, rspecs: RSpecs, names: Collection[str]) -> tuple[str, ...]:
        """Recompute everyone's cpuset (``names`` is not enough: the shared pool is everyone's)
        and write the groups that differ."""
        where = self._where()
        if where is None:
            return ()
        h, _ = where
        try:
            return self._apply(h, rspecs)
        except BackendError:
            self._reserved, self._shared, self._written = None, None, {}
            raise

    def _apply(self, h: Hierarchy, rspecs: RSpecs) -> tuple[str, ...]:
        allowed = self.allowed(h)
        parent = self.tree.parent(h)
        children = self.tree.children(h)
        allocation = allocate_cores(allowed, core_requests(rspecs), self._held(h, children),
                                    slivers=[*rspecs, *children])
        if h.version == 1:  # the parent holds every allowed CPU (grown before its children)
            current = self._list(parent / "cpuset.cpus") or ()
            if set(allowed) - set(current):
                self.tree.host.write_text(parent / "cpuset.cpus", format_cpu_list(set(allowed) | set(current)))
        known = {n: self._written[n] for n in allocation.cpus if n in self._written}
        current = {**self._current(h, [n for n in allocation.cpus if n not in known]), **known}
        # two steps, so that a core never reaches its new holder while another still has it:
        # first everyone who loses a core keeps only what stays (or the shared pool), then all
        # get their final CPUs
        steps = [{n: tuple(c for c in current[n] if c in final) or allocation.shared
                  for n, final in allocation.cpus.items() if set(current[n]) - set(final)}, allocation.cpus]
        failures: list[str] = []
        for step in steps:
            for name in sorted(step):
                if name not in rspecs and name not in children:
                    continue
                try:
                    if name in rspecs:
                        self.tree.ensure(name, [h])
                    self._write(h, name, step[name], self._written.get(name, current.get(name)))
                except BackendError as exc:
                    if f"sliver {name}: cpuset: {exc}" not in failures:
                        failures.append(f"sliver {name}: cpuset: {exc}")
        if h.version == 1 and set(self._list(parent / "cpuset.cpus") or ()) != set(allowed):
            try:  # a CPU gone offline: shrink the parent after its children
                self.tree.host.write_text(parent / "cpuset.cpus", format_cpu_list(allowed))
            except BackendError as exc:
                failures.append(f"cpuset parent: {exc}")
        self._reserved, self._shared, self.allocation = allocation.reserved, allocation.shared, allocation
        if failures:
            raise BackendError("; ".join(failures))
        return allocation.notes

    def _write(self, h: Hierarchy, name: str, cpus: tuple[int, ...], current: tuple[int, ...] | None = None) -> None:
        group = self.tree.parent(h) / name
        if h.version == 1 and not self.tree.read(group / "cpuset.mems"):
            self.tree.host.write_text(group / "cpuset.mems", self.tree.read(group.parent / "cpuset.mems") or "")
        if current is None:
            current = self._list(group / "cpuset.cpus") or ()
        if tuple(current) != tuple(cpus):
            self.tree.host.write_text(group / "cpuset.cpus", format_cpu_list(cpus))
        self._written[name] = tuple(cpus)

    def remove(self, name: str, uid: int) -> None:
        self._written.pop(name, None)
        super().remove(name, uid)

    def observed(self) -> dict[str, dict[str, int]]:
        """Per sliver: the CPUs its cpuset holds and how many of them are its alone."""
        where = self._where()
        if where is None:
            return {}
        h, _ = where
        current = self._current(h, self.tree.children(h))
        alone = exclusive_cores(current)
        return {name: {"cpuset_cpus": len(cpus), "nm_cpu_cores": len(alone.get(name, ()))}
                for name, cpus in current.items() if cpus}
