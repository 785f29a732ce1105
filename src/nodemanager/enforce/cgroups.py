"""CPU and memory enforcement through cgroupfs, on cgroup v1, v2, or a hybrid of both.

Driver choice, per controller: v2 when the controller is listed in the cgroup2 mount's
``cgroup.controllers``; else the v1 hierarchy mounted with that controller; else the controller
is unavailable (``available()`` says why). Whatever drives the controllers, a cgroup2 mount (even
one with no controllers, as on hybrid hosts) is also used to *track* a sliver's processes, because
its ``cgroup.kill`` ends a forking sliver at once; without one, the controllers' own groups are
emptied by repeated SIGKILL.

Layout: one parent group (``nodemanager``) at the top of each hierarchy used, one child per
sliver named by the sliver. On v2 the parent holds no process and has ``+cpu``/``+memory`` in its
``cgroup.subtree_control``.

Placement (the PAM-free login mechanism): :meth:`CgroupTree.place` moves every process of each
sliver's uid into the sliver's groups; the daemon calls it every few seconds, so an SSH login
(sshd forks the session as the sliver's uid) or anything not started by Start lands in the
sliver's cgroup within one sweep, with no PAM module and no ForceCommand. Programs started by
Start join at once through ``Host.spawn_detached(cgroups=tree.dirs(name))``.

Weights and limits: ``core.allocation.cpu_weights`` (v1 ``cpu.shares = 1024 x share``, v2
``cpu.weight = 100 x share``, raised for guarantees); memory: v1 ``memory.limit_in_bytes``, v2
``memory.max``; 0 KiB = unlimited. The kernel's OOM killer then acts inside the sliver's group.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core.allocation import V1_WEIGHTS, V2_WEIGHTS, WeightScale, cpu_weights
from ..core.errors import BackendError
from ..host import Host
from .base import RSpecs

log = logging.getLogger(__name__)

MOUNTS = Path("/proc/self/mounts")
#: v1 reads an unlimited memory limit back as a huge number (PAGE_COUNTER_MAX pages).
_V1_UNLIMITED = 1 << 62
#: How long ``remove`` keeps killing a sliver's processes before giving up.
KILL_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Hierarchy:
    mount: Path
    version: int  # 1 or 2
    controllers: frozenset[str]


def parse_mounts(text: str) -> list[Hierarchy]:
    """The cgroup hierarchies of a ``/proc/self/mounts`` text. v1 controllers come from the
    mount options; a v2 mount's controllers are read later from its ``cgroup.controllers``."""
    found: list[Hierarchy] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount = Path(fields[1].replace("\\040", " "))
        if fields[2] == "cgroup2":
            found.append(Hierarchy(mount, 2, frozenset()))
        elif fields[2] == "cgroup":
            options = set(fields[3].split(","))
            found.append(Hierarchy(mount, 1, frozenset(options & {"cpu", "memory", "freezer", "pids", "cpuacct"})))
    return found


def detect_hierarchies(host: Host) -> list[Hierarchy]:
    """The cgroup hierarchies mounted on this machine, v2 ones with their controllers."""
    raw = host.read_file(MOUNTS)
    result = []
    for h in parse_mounts((raw or b"").decode("utf-8", "replace")):
        if h.version == 2:
            text = (host.read_file(h.mount / "cgroup.controllers") or b"").decode()
            h = Hierarchy(h.mount, 2, frozenset(text.split()))
        result.append(h)
    return result


class CgroupTree:
    """The sliver groups of the controllers in ``controllers``, in whatever hierarchies drive
    them, plus the tracking hierarchy. Shared by the CPU and memory enforcers."""

    def __init__(self, host: Host, controllers: Iterable[str] = ("cpu", "memory"), *,
                 group: str = "nodemanager", hierarchies: list[Hierarchy] | None = None) -> None:
        self.host = host
        self.group = group
        self.controllers = tuple(controllers)
        self.hierarchies = detect_hierarchies(host) if hierarchies is None else hierarchies
        self._v2 = next((h for h in self.hierarchies if h.version == 2), None)

    # --- where things live ----------------------------------------------------------------
    def hierarchy_for(self, controller: str) -> Hierarchy | None:
        if self._v2 is not None and controller in self._v2.controllers:
            return self._v2
        return next((h for h in self.hierarchies if h.version == 1 and controller in h.controllers), None)

    def missing(self, controller: str) -> str | None:
        """Why ``controller`` cannot be used here, or None."""
        if self.hierarchy_for(controller) is None:
            mounted = ", ".join(f"{h.mount} (v{h.version}: {' '.join(sorted(h.controllers)) or 'no controllers'})"
                                for h in self.hierarchies) or "none"
            return f"no cgroup hierarchy offers the {controller} controller (mounted: {mounted})"
        return None

    def used(self) -> list[Hierarchy]:
        """Distinct hierarchies in use: the controllers' and the tracking one, v2 first."""
        result: list[Hierarchy] = []
        candidates = [self._v2] + [self.hierarchy_for(c) for c in self.controllers]
        for h in candidates:
            if h is not None and h not in result:
                result.append(h)
        return result

    def parent(self, h: Hierarchy) -> Path:
        return h.mount / self.group

    def dirs(self, name: str) -> list[Path]:
        """The sliver's group in every hierarchy used: what ``spawn_detached(cgroups=...)`` joins."""
        return [self.parent(h) / name for h in self.used()]

    # --- setting up -----------------------------------------------------------------------
    def ensure_parents(self) -> None:
        """Create the parent groups; on v2 enable our controllers for the children. Idempotent."""
        for h in self.used():
            self.host.makedirs_owned(self.parent(h), 0, 0, 0o755)
            if h.version == 2:
                wanted = [c for c in self.controllers if c in h.controllers]
                for where in (h.mount, self.parent(h)):
                    self._enable(where, wanted)

    def _enable(self, where: Path, controllers: list[str]) -> None:
        current = set((self.host.read_file(where / "cgroup.subtree_control") or b"").decode().split())
        todo = [c for c in controllers if c not in current]
        if todo:
            self.host.write_text(where / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))

    def ensure(self, name: str, hierarchies: Iterable[Hierarchy]) -> None:
        for h in hierarchies:
            self.host.makedirs_owned(self.parent(h) / name, 0, 0, 0o755)

    def children(self, h: Hierarchy) -> list[str]:
        return self.host.list_dirs(self.parent(h))

    def read(self, path: Path) -> str | None:
        raw = self.host.read_file(path)
        return None if raw is None else raw.decode("utf-8", "replace").strip()

    def write_if_different(self, path: Path, value: str) -> bool:
        """Write ``value`` unless the file already reads so; True when written."""
        if self.read(path) == value:
            return False
        self.host.write_text(path, value)
        return True

    # --- processes ------------------------------------------------------------------------
    def members(self, group: Path) -> list[int]:
        text = self.read(group / "cgroup.procs") or ""
        return [int(p) for p in text.split() if p.isdigit()]

    def place(self, uids: Mapping[str, int]) -> int:
        """Move every process of each sliver's uid into the sliver's groups (that exist).
        Returns how many moves were made. A process that exits meanwhile is skipped."""
        by_uid = self.host.pids_by_uid(sorted(set(uids.values())))
        used = self.used()
        moved = 0
        for name, uid in sorted(uids.items()):
            pids = by_uid.get(uid, [])
            targets = [(h, self.parent(h) / name) for h in used]
            targets = [(h, d) for h, d in targets if self.host.stat_file(d) is not None]
            if not pids or not targets:
                continue
            relative = {h: f"/{self.group}/{name}" for h, _ in targets}
            for pid in pids:
                current = _cgroup_paths(self.read(Path(f"/proc/{pid}/cgroup")) or "")
                for h, directory in targets:
                    if _membership(current, h) == relative[h]:
                        continue
                    try:
                        self.host.write_text(directory / "cgroup.procs", str(pid))
                        moved += 1
                    except BackendError as exc:
                        log.debug("event=place_failed sliver=%s pid=%d error=%r", name, pid, str(exc))
        return moved

    def kill_and_remove(self, name: str) -> None:
        """Kill every process in the sliver's groups and remove the groups. Idempotent."""
        groups = [self.parent(h) / name for h in self.used()]
        groups = [g for g in groups if self.host.stat_file(g) is not None]
        if not groups:
            return
        for g in groups:
            if self.host.stat_file(g / "cgroup.kill") is not None:
                self.host.write_text(g / "cgroup.kill", "1")
        deadline = self.host.monotonic() + KILL_TIMEOUT
        while True:
            alive = sorted({pid for g in groups for pid in self.members(g)})
            if not alive:
                break
            if self.host.monotonic() > deadline:
                raise BackendError(f"sliver {name}: {len(alive)} processes survive SIGKILL in its cgroup")
            for pid in alive:
                if pid > 1:
                    self.host.kill(pid, signal.SIGKILL)
            self.host.sleep(0.05)
        for g in groups:
            self._rmdir(g)

    def _rmdir(self, group: Path) -> None:
        """rmdir, retried briefly: a just-killed group stays busy until its tasks are reaped."""
        deadline = self.host.monotonic() + KILL_TIMEOUT
        while True:
            try:
                self.host.remove_dir(group)
                return
            except BackendError:
                if self.host.monotonic() > deadline:
                    raise
                self.host.sleep(0.05)


def _cgroup_paths(text: str) -> list[tuple[str, str, str]]:
    lines = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            lines.append((parts[0], parts[1], parts[2]))
    return lines


def _membership(lines: list[tuple[str, str, str]], h: Hierarchy) -> str | None:
    for hid, controllers, path in lines:
        if h.version == 2 and hid == "0" and controllers == "":
            return path
        if h.version == 1 and h.controllers & set(controllers.split(",")):
            return path
    return None


def _collect(failures: list[str]) -> None:
    if failures:
        raise BackendError("; ".join(failures))


class _ControllerEnforcer:
    """What the cpu and memory enforcers share: ``name`` is also the cgroup controller they need;
    both are available once that controller is and their parent groups can be made, and both
    remove a sliver by killing and removing its group (``CgroupTree.kill_and_remove``)."""

    name: str

    def __init__(self, tree: CgroupTree) -> None:
        self.tree = tree

    def available(self) -> str | None:
        reason = self.tree.missing(self.name)
        if reason is None:
            try:
                self.tree.ensure_parents()
            except BackendError as exc:
                return f"cannot prepare the {self.name} cgroup: {exc}"
        return reason

    def remove(self, name: str, uid: int) -> None:
        self.tree.kill_and_remove(name)


class CpuEnforcer(_ControllerEnforcer):
    """``nm_cpu_share`` and ``nm_cpu_guaranteed_share`` as CPU weights (see module docstring)."""

    name = "cpu"

    def _where(self) -> tuple[Hierarchy, str, WeightScale] | None:
        h = self.tree.hierarchy_for("cpu")
        if h is None:
            return None
        return (h, "cpu.weight", V2_WEIGHTS) if h.version == 2 else (h, "cpu.shares", V1_WEIGHTS)

    def apply(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> tuple[str, ...]:
        where = self._where()
        if where is None:
            return ()
        h, knob, scale = where
        self.tree.ensure_parents()
        plan = cpu_weights({n: r.get("nm_cpu_share", 1) for n, r in rspecs.items()},
                           {n: r.get("nm_cpu_guaranteed_share", 0) for n, r in rspecs.items()}, scale)
        failures: list[str] = []
        for name, weight in sorted(plan.children.items()):
            try:
                self.tree.ensure(name, self.tree.used())
                self.tree.write_if_different(self.tree.parent(h) / name / knob, str(weight))
            except BackendError as exc:
                failures.append(f"sliver {name}: cpu weight: {exc}")
        try:
            self.tree.write_if_different(self.tree.parent(h) / knob, str(plan.parent))
        except BackendError as exc:
            failures.append(f"cpu parent weight: {exc}")
        _remove_empty_strays(self.tree, h, rspecs)
        _collect(failures)
        return plan.notes

    def observed(self) -> dict[str, dict[str, int]]:
        where = self._where()
        if where is None:
            return {}
        h, knob, scale = where
        weights = {}
        for name in self.tree.children(h):
            value = self.tree.read(self.tree.parent(h) / name / knob)
            if value is not None and value.isdigit():
                weights[name] = int(value)
        parent_text = self.tree.read(self.tree.parent(h) / knob) or ""
        parent = int(parent_text) if parent_text.isdigit() else scale.unit
        total = sum(weights.values()) or 1
        return {
            name: {
                "cpu_weight": w,
                "nm_cpu_share": w // scale.unit,
                # the fraction these weights give under full contention, rest of the node = 1 unit
                "nm_cpu_guaranteed_share": 1000 * parent * w // ((parent + scale.unit) * total),
            }
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

    def apply(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> tuple[str, ...]:
        where = self._where()
        if where is None:
            return ()
        h, knob = where
        self.tree.ensure_parents()
        failures: list[str] = []
        for name, rspec in sorted(rspecs.items()):
            kib = max(0, rspec.get("nm_memory_max", 0))
            path = self.tree.parent(h) / name / knob
            try:
                self.tree.ensure(name, self.tree.used())
                if self._read_kib(path) != kib:
                    self.tree.host.write_text(path, str(kib * 1024) if kib else ("max" if h.version == 2 else "-1"))
            except BackendError as exc:
                failures.append(f"sliver {name}: memory limit: {exc}")
        _remove_empty_strays(self.tree, h, rspecs)
        _collect(failures)
        return ()

    def _read_kib(self, path: Path) -> int | None:
        value = self.tree.read(path)
        if value is None:
            return None
        if value == "max":
            return 0
        if not value.isdigit():
            return None
        number = int(value)
        return 0 if number >= _V1_UNLIMITED else number // 1024

    def observed(self) -> dict[str, dict[str, int]]:
        where = self._where()
        if where is None:
            return {}
        h, knob = where
        result = {}
        for name in self.tree.children(h):
            kib = self._read_kib(self.tree.parent(h) / name / knob)
            if kib is not None:
                result[name] = {"nm_memory_max": kib}
        return result


def _remove_empty_strays(tree: CgroupTree, h: Hierarchy, rspecs: RSpecs) -> None:
    """Groups of slivers no longer in ``rspecs`` are removed when empty; a group that still has
    processes is left for ``remove`` (which kills them) and logged."""
    for name in tree.children(h):
        if name in rspecs:
            continue
        if tree.members(tree.parent(h) / name):
            log.warning("event=stray_cgroup sliver=%s path=%s", name, tree.parent(h) / name)
            continue
        try:
            tree.host.remove_dir(tree.parent(h) / name)
        except BackendError as exc:
            log.warning("event=stray_cgroup sliver=%s error=%r", name, str(exc))
