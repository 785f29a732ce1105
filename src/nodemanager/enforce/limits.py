"""The cgroup limits: CPU weight, memory limit and task limit of each sliver's group.

* ``nm_cpu_share``/``nm_cpu_guaranteed_share``: ``core.allocation.cpu_weights`` (v1
  ``cpu.shares = 1024 x share``, v2 ``cpu.weight = 100 x share``, raised for guarantees).
* ``nm_memory_max`` (KiB, 0 = unlimited): v1 ``memory.limit_in_bytes``, v2 ``memory.max``; the
  kernel's OOM killer then acts inside the sliver's group. On v1 the group also asks for
  ``memory.move_charge_at_immigrate`` so memory charged before a process joined follows it;
  kernels that dropped the feature refuse the write, which is fine: placement at once leaves
  next to nothing charged outside.
* ``nm_pids_max`` (tasks): ``pids.max`` (v1 or v2). A fork loop stops at the limit instead of
  exhausting the node's pids, which also keeps Stop's work bounded.

Each enforcer writes a sliver's values three ways: :meth:`prepare` (one new sliver, before its
first process: its own values, the CPU guarantee arithmetic comes with the next pass),
:meth:`apply` (every sliver, reading the kernel first: drift repair) and :meth:`apply_some`
(only the named slivers, from what this enforcer last wrote: the incremental pass after a loan).
Removing a sliver ends its processes through the cgroup (``enforce.tasks``) and removes its
groups; groups of slivers that are gone are the sweep's job (``enforce.tasks.sweep``), never
``apply``'s, so a sliver being created is never mistaken for a leftover.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from ..core.allocation import V1_WEIGHTS, V2_WEIGHTS, WeightScale, cpu_weights, full_contention_permille
from ..core.errors import BackendError
from ..core.rspec import DEFAULT_PIDS_MAX
from .base import RSpecs
from .cgroups import CgroupTree, Hierarchy
from .tasks import kill_and_remove

#: v1 reads an unlimited memory limit back as a huge number (PAGE_COUNTER_MAX pages).
_V1_UNLIMITED = 1 << 62


def _collect(failures: list[str]) -> None:
    if failures:
        raise BackendError("; ".join(failures))


class _ControllerEnforcer:
    """What the cgroup enforcers share: ``name`` is also the controller they need; each is
    available once that controller is and the parent groups can be made."""

    name: str

    def __init__(self, tree: CgroupTree) -> None:
        self.tree = tree

    def available(self) -> str | None:
        try:
            reason = self.tree.missing(self.name)
            if reason is None:
                self.tree.ensure_parents()
        except BackendError as exc:
            return f"cannot prepare the {self.name} cgroup: {exc}"
        return reason

    def remove(self, name: str, uid: int) -> None:
        kill_and_remove(self.tree, name, uid)

    def mechanism(self) -> str:
        h = self.tree.hierarchy_for(self.name)
        return f"cgroup v{h.version} at {h.mount}" if h else "none"

    # per-sliver value: subclasses say where and what
    def _where(self) -> tuple[Hierarchy, str] | None:
        raise NotImplementedError

    def _value(self, rspec: Mapping[str, int], h: Hierarchy) -> str:
        raise NotImplementedError

    def _same(self, current: str | None, wanted: str) -> bool:
        return current == wanted

    def _read_groups(self, *files: str) -> dict[str, tuple[str | None, ...]]:
        """Each sliver group's value file (the knob) and ``files``, read as text (None when
        missing); no hierarchy for the controller: nothing. For ``observed``."""
        where = self._where()
        if where is None:
            return {}
        h, knob = where
        parent = self.tree.parent(h)
        return {name: tuple(self.tree.read(parent / name / f) for f in (knob, *files))
                for name in self.tree.children(h)}

    def prepare(self, name: str, rspec: Mapping[str, int]) -> None:
        """Write the sliver's value into its (new) group. Idempotent."""
        self.apply_some({name: rspec}, [name])

    def apply(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> tuple[str, ...]:
        self.tree.ensure_parents()
        return self.apply_some(rspecs, sorted(rspecs))

    def apply_some(self, rspecs: RSpecs, names: Collection[str]) -> tuple[str, ...]:
        """Write the values of ``names`` (slivers of ``rspecs``; others are skipped), reading
        each first so an equal value is not written again."""
        where = self._where()
        if where is None:
            return ()
        h, knob = where
        failures: list[str] = []
        for name in sorted(n for n in names if n in rspecs):
            path = self.tree.parent(h) / name / knob
            try:
                self.tree.ensure(name)
                wanted = self._value(rspecs[name], h)
                if not self._same(self.tree.read(path), wanted):
                    self.tree.host.write_text(path, wanted)
            except BackendError as exc:
                failures.append(f"sliver {name}: {self.name} limit: {exc}")
        _collect(failures)
        return ()


class CpuEnforcer(_ControllerEnforcer):
    """``nm_cpu_share`` and ``nm_cpu_guaranteed_share`` as CPU weights (see module docstring).

    The guarantee arithmetic is global (every sliver's weight depends on all the others), so
    every pass computes the whole plan; an incremental pass then writes only the weights that
    differ from the plan this enforcer last wrote."""

    name = "cpu"

    def __init__(self, tree: CgroupTree) -> None:
        super().__init__(tree)
        #: weights written by the last pass (name -> weight, None -> the parent's); empty when
        #: the kernel must be read (first pass, after a failure, full passes).
        self._written: dict[str | None, int] = {}

    def _scale(self) -> tuple[Hierarchy, str, WeightScale] | None:
        h = self.tree.hierarchy_for("cpu")
        if h is None:
            return None
        return (h, "cpu.weight", V2_WEIGHTS) if h.version == 2 else (h, "cpu.shares", V1_WEIGHTS)

    def _where(self) -> tuple[Hierarchy, str] | None:
        found = self._scale()
        return None if found is None else found[:2]

    def _value(self, rspec: Mapping[str, int], h: Hierarchy) -> str:
        scale = V2_WEIGHTS if h.version == 2 else V1_WEIGHTS
        return str(min(scale.maximum, scale.unit * max(1, rspec.get("nm_cpu_share", 1))))

    def apply(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> tuple[str, ...]:
        self.tree.ensure_parents()
        self._written = {}
        return self.apply_some(rspecs, rspecs)

    def apply_some(self, rspecs: RSpecs, names: Collection[str]) -> tuple[str, ...]:
        found = self._scale()
        if found is None:
            return ()
        h, knob, scale = found
        plan = cpu_weights({n: r.get("nm_cpu_share", 1) for n, r in rspecs.items()},
                           {n: r.get("nm_cpu_guaranteed_share", 0) for n, r in rspecs.items()}, scale)
        wanted: dict[str | None, int] = {None: plan.parent, **plan.children}
        known, self._written = self._written, {}
        failures: list[str] = []
        for name, weight in sorted(wanted.items(), key=lambda item: item[0] or ""):
            if known.get(name) == weight:
                self._written[name] = weight
                continue
            path = self.tree.parent(h) / knob if name is None else self.tree.parent(h) / name / knob
            try:
                if name is not None:
                    self.tree.ensure(name)
                self.tree.write_if_different(path, str(weight))
                self._written[name] = weight
            except BackendError as exc:
                failures.append(f"sliver {name}: cpu weight: {exc}" if name else f"cpu parent weight: {exc}")
        _collect(failures)
        return plan.notes

    def prepare(self, name: str, rspec: Mapping[str, int]) -> None:
        """The new sliver's base weight (``unit x share``); guarantees follow with the next pass."""
        self._written.pop(name, None)
        _ControllerEnforcer.apply_some(self, {name: rspec}, [name])

    def remove(self, name: str, uid: int) -> None:
        self._written.pop(name, None)
        super().remove(name, uid)

    def observed(self) -> dict[str, dict[str, int]]:
        found = self._scale()
        if found is None:
            return {}
        h, knob, scale = found
        weights = {name: int(value) for name, (value,) in self._read_groups().items()
                   if value is not None and value.isdigit()}
        parent_text = self.tree.read(self.tree.parent(h) / knob) or ""
        parent = int(parent_text) if parent_text.isdigit() else scale.unit
        # what these weights give under full contention, the rest of the node being one unit
        guaranteed = full_contention_permille(weights, scale.unit, parent)
        return {
            name: {"cpu_weight": w, "nm_cpu_share": w // scale.unit, "nm_cpu_guaranteed_share": guaranteed[name]}
            for name, w in weights.items()
        }


class MemoryEnforcer(_ControllerEnforcer):
    """``nm_memory_max`` (KiB, 0 = unlimited) as the sliver group's memory limit."""

    name = "memory"

    def _where(self) -> tuple[Hierarchy, str] | None:
        h = self.tree.hierarchy_for("memory")
        if h is None:
            return None
        return (h, "memory.max") if h.version == 2 else (h, "memory.limit_in_bytes")

    def _value(self, rspec: Mapping[str, int], h: Hierarchy) -> str:
        kib = max(0, rspec.get("nm_memory_max", 0))
        return str(kib * 1024) if kib else ("max" if h.version == 2 else "-1")

    def _same(self, current: str | None, wanted: str) -> bool:
        return _kib(current) == _kib(wanted)

    def prepare(self, name: str, rspec: Mapping[str, int]) -> None:
        """The limit, and on v1 the request that earlier charges follow a joining process."""
        super().prepare(name, rspec)
        h = self.tree.hierarchy_for("memory")
        if h is not None and h.version == 1:
            try:
                self.tree.write_if_different(self.tree.parent(h) / name / "memory.move_charge_at_immigrate", "3")
            except BackendError:
                pass  # kernels from 6.x refuse it (the feature is gone); placement at once suffices

    def observed(self) -> dict[str, dict[str, int]]:
        kibs = {name: _kib(value) for name, (value,) in self._read_groups().items()}
        return {name: {"nm_memory_max": kib} for name, kib in kibs.items() if kib is not None}


class PidsEnforcer(_ControllerEnforcer):
    """``nm_pids_max`` as the sliver group's ``pids.max``."""

    name = "pids"

    def _where(self) -> tuple[Hierarchy, str] | None:
        h = self.tree.hierarchy_for("pids")
        return None if h is None else (h, "pids.max")

    def _value(self, rspec: Mapping[str, int], h: Hierarchy) -> str:
        return str(max(1, rspec.get("nm_pids_max", DEFAULT_PIDS_MAX)))

    def observed(self) -> dict[str, dict[str, int]]:
        result = {}
        for name, (limit, current) in self._read_groups("pids.current").items():
            if limit is None:
                continue
            values = {"nm_pids_max": int(limit) if limit.isdigit() else 0}
            if current is not None and current.isdigit():
                values["pids_current"] = int(current)
            result[name] = values
        return result


def _kib(value: str | None) -> int | None:
    """A memory limit file's value in KiB (0 = unlimited), or None when unreadable."""
    if value is None:
        return None
    if value in ("max", "-1"):
        return 0
    if not value.isdigit():
        return None
    number = int(value)
    return 0 if number >= _V1_UNLIMITED else number // 1024
