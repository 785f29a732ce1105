"""The slivers' cgroups on cgroup v1, v2, or a hybrid of both: where they live and what can be
done to them. The limits written into them are ``enforce.limits``; stopping a sliver through
them is ``enforce.tasks``; joining them at once on a uid change is ``enforce.placement``.

Driver choice, per controller: v2 when the controller is listed in the cgroup2 mount's
``cgroup.controllers``; else the v1 hierarchy mounted with that controller; else the controller
is unavailable (``missing()`` says why). The freezer is special: v2 has it in every group
(``cgroup.freeze``), so only a v1 ``freezer`` hierarchy is added to the tree. Whatever drives
the controllers, a cgroup2 mount (even one with no controllers, as on hybrid hosts) is also used
to *track* a sliver's processes, because its ``cgroup.kill`` ends a forking sliver at once.

Layout: one parent group (``nodemanager``) at the top of each hierarchy used, one child per
sliver named by its account. On v2 the parent holds no process and has our controllers in its
``cgroup.subtree_control``.

Placement sweep: :meth:`CgroupTree.place` moves every process of each sliver's uid into the
sliver's groups. Since the process-event listener places a login the moment its uid changes,
this periodic sweep is only the safety net (for events the kernel dropped, or machines where
the connector cannot be used). Programs started by Start join at once through
``Host.spawn_detached(cgroups=tree.dirs(name))``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BackendError
from ..host import Host
from ..hostsweep import MOUNTS_FILE, mount_entries

log = logging.getLogger(__name__)

#: How long removing a group is retried: a just-killed group stays busy until its tasks are gone.
RMDIR_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Hierarchy:
    mount: Path
    version: int  # 1 or 2
    controllers: frozenset[str]


def parse_mounts(text: str) -> list[Hierarchy]:
    """The cgroup hierarchies of a ``/proc/self/mounts`` text. v1 controllers come from the
    mount options; a v2 mount's controllers are read later from its ``cgroup.controllers``."""
    found: list[Hierarchy] = []
    for point, fstype, options in mount_entries(text):
        if fstype == "cgroup2":
            found.append(Hierarchy(Path(point), 2, frozenset()))
        elif fstype == "cgroup":
            controllers = set(options.split(",")) & {"cpu", "memory", "freezer", "pids", "cpuacct", "cpuset"}
            found.append(Hierarchy(Path(point), 1, frozenset(controllers)))
    return found


def detect_hierarchies(host: Host) -> list[Hierarchy]:
    """The cgroup hierarchies mounted on this machine, v2 ones with their controllers."""
    raw = host.read_file(MOUNTS_FILE)
    result = []
    for h in parse_mounts((raw or b"").decode("utf-8", "replace")):
        if h.version == 2:
            text = (host.read_file(h.mount / "cgroup.controllers") or b"").decode()
            h = Hierarchy(h.mount, 2, frozenset(text.split()))
        result.append(h)
    return result


class CgroupTree:
    """The sliver groups of the controllers in ``controllers``, in whatever hierarchies drive
    them, plus the tracking hierarchy. Shared by the cpu, memory and pids enforcers, the stop
    procedure and the placement listener. The hierarchies are read on first use, not when the
    tree is built (building a node touches nothing). Any thread."""

    def __init__(self, host: Host, controllers: Iterable[str] = ("cpu", "memory"), *,
                 group: str = "nodemanager", hierarchies: list[Hierarchy] | None = None) -> None:
        self.host = host
        self.group = group
        self.controllers = tuple(controllers)
        self._hierarchies = hierarchies

    @property
    def hierarchies(self) -> list[Hierarchy]:
        if self._hierarchies is None:
            self._hierarchies = detect_hierarchies(self.host)
        return self._hierarchies

    # --- where things live ----------------------------------------------------------------
    @property
    def v2(self) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.version == 2), None)

    def hierarchy_for(self, controller: str) -> Hierarchy | None:
        v2 = self.v2
        if v2 is not None and controller in v2.controllers:
            return v2
        return next((h for h in self.hierarchies if h.version == 1 and controller in h.controllers), None)

    def missing(self, controller: str) -> str | None:
        """Why ``controller`` cannot be used here, or None."""
        if self.hierarchy_for(controller) is None:
            mounted = ", ".join(f"{h.mount} (v{h.version}: {' '.join(sorted(h.controllers)) or 'no controllers'})"
                                for h in self.hierarchies) or "none"
            return f"no cgroup hierarchy offers the {controller} controller (mounted: {mounted})"
        return None

    def used(self) -> list[Hierarchy]:
        """Distinct hierarchies in use: the tracking one (v2) first, then the controllers'."""
        result: list[Hierarchy] = []
        for h in [self.v2] + [self.hierarchy_for(c) for c in self.controllers]:
            if h is not None and h not in result:
                result.append(h)
        return result

    def parent(self, h: Hierarchy) -> Path:
        return h.mount / self.group

    def dirs(self, name: str) -> list[Path]:
        """The sliver's group in every hierarchy used: what ``spawn_detached(cgroups=...)`` joins."""
        return [self.parent(h) / name for h in self.used()]

    def existing(self, name: str) -> list[tuple[Hierarchy, Path]]:
        """The sliver's groups that exist now."""
        return [(h, d) for h in self.used() if self.host.stat_file(d := self.parent(h) / name) is not None]

    def children(self, h: Hierarchy) -> list[str]:
        return self.host.list_dirs(self.parent(h))

    # --- setting up -----------------------------------------------------------------------
    def ensure_parents(self) -> None:
        """Create the parent groups; on v2 enable our controllers for the children. Idempotent."""
        for h in self.used():
            self.host.makedirs_owned(self.parent(h), 0, 0, 0o755)
            self._inherit_cpuset(h, self.parent(h))
            if h.version == 2:
                wanted = [c for c in self.controllers if c in h.controllers]
                for where in (h.mount, self.parent(h)):
                    self._enable(where, wanted)

    def _enable(self, where: Path, controllers: list[str]) -> None:
        current = set((self.host.read_file(where / "cgroup.subtree_control") or b"").decode().split())
        todo = [c for c in controllers if c not in current]
        if todo:
            self.host.write_text(where / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))

    def ensure(self, name: str, hierarchies: Iterable[Hierarchy] | None = None) -> None:
        for h in self.used() if hierarchies is None else hierarchies:
            self.host.makedirs_owned(self.parent(h) / name, 0, 0, 0o755)
            self._inherit_cpuset(h, self.parent(h) / name)

    def _inherit_cpuset(self, h: Hierarchy, group: Path) -> None:
        """A new v1 cpuset group has no CPUs and no memory nodes, and refuses every task until
        it has both: give it its parent's (``enforce.cpuset`` narrows a sliver's CPUs before
        its first process joins). v2 groups inherit by themselves. Idempotent."""
        if h.version != 1 or "cpuset" not in h.controllers or self.read(group / "cpuset.cpus"):
            return  # one read per call: mems are written first, so CPUs set means both are
        for knob in ("cpuset.mems", "cpuset.cpus"):
            if not self.read(group / knob):
                self.host.write_text(group / knob, self.read(group.parent / knob) or "")

    def read(self, path: Path) -> str | None:
        raw = self.host.read_file(path)
        return None if raw is None else raw.decode("utf-8", "replace").strip()

    def write_if_different(self, path: Path, value: str) -> bool:
        """Write ``value`` unless the file already reads so; True when written."""
        if self.read(path) == value:
            return False
        self.host.write_text(path, value)
        return True

    def remove(self, name: str) -> None:
        """Remove the sliver's (empty) groups, retrying briefly while the kernel still counts
        tasks that were just killed. Missing groups are fine."""
        for _, group in self.existing(name):
            deadline = self.host.monotonic() + RMDIR_TIMEOUT
            while True:
                try:
                    self.host.remove_dir(group)
                    break
                except BackendError:
                    if self.host.monotonic() > deadline:
                        raise
                    self.host.sleep(0.05)

    # --- processes ------------------------------------------------------------------------
    def members(self, group: Path) -> list[int]:
        text = self.read(group / "cgroup.procs") or ""
        return [int(p) for p in text.split() if p.isdigit()]

    def members_of(self, name: str) -> set[int]:
        """Every process in any of the sliver's groups."""
        return {pid for _, group in self.existing(name) for pid in self.members(group)}

    def is_member(self, pid: int, name: str) -> bool:
        """True when ``pid`` is in one of the sliver's groups (read from ``/proc/<pid>/cgroup``:
        what a signal check uses once the process is open)."""
        lines = _cgroup_paths(self.read(Path(f"/proc/{pid}/cgroup")) or "")
        want = f"/{self.group}/{name}"
        return any(_membership(lines, h) == want for h in self.used())

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
            relative = f"/{self.group}/{name}"
            for pid in pids:
                current = _cgroup_paths(self.read(Path(f"/proc/{pid}/cgroup")) or "")
                for h, directory in targets:
                    if _membership(current, h) == relative:
                        continue
                    try:
                        self.host.write_text(directory / "cgroup.procs", str(pid))
                        moved += 1
                    except BackendError as exc:
                        log.debug("event=place_failed sliver=%s pid=%d error=%r", name, pid, str(exc))
        return moved

    # --- freezing and killing (the steps of enforce.tasks) ------------------------------------
    def kill_all(self, name: str) -> bool:
        """Write ``cgroup.kill`` in the sliver's v2 group: every task in it, and every task it
        forks meanwhile, is killed by the kernel at once. False when there is no such file
        (no v2 group, or a kernel older than 5.14)."""
        v2 = self.v2
        if v2 is None:
            return False
        knob = self.parent(v2) / name / "cgroup.kill"
        if self.host.stat_file(knob) is None:
            return False
        self.host.write_text(knob, "1")
        return True

    def _freezer(self, name: str) -> tuple[Path, str, str, str] | None:
        """(state file, frozen value, thawed value, file to poll) of the sliver's freezer: v1's
        ``freezer.state``, else v2's ``cgroup.freeze``."""
        v1 = next((h for h in self.hierarchies if h.version == 1 and "freezer" in h.controllers), None)
        if v1 is not None and v1 in self.used():
            state = self.parent(v1) / name / "freezer.state"
            if self.host.stat_file(state) is not None:
                return state, "FROZEN", "THAWED", str(state)
        v2 = self.v2
        if v2 is not None:
            knob = self.parent(v2) / name / "cgroup.freeze"
            if self.host.stat_file(knob) is not None:
                return knob, "1", "0", str(self.parent(v2) / name / "cgroup.events")
        return None

    def freeze(self, name: str, timeout: float) -> bool | None:
        """Freeze the sliver's group and wait at most ``timeout`` seconds for the kernel to
        report it frozen (the v1 freezer has been seen to stay FREEZING). True when frozen,
        False when still freezing at the timeout, None when there is no freezer."""
        found = self._freezer(name)
        if found is None:
            return None
        knob, frozen, _, poll = found
        self.host.write_text(knob, frozen)
        deadline = self.host.monotonic() + timeout
        while True:
            text = self.read(Path(poll)) or ""
            if text == "FROZEN" or "frozen 1" in text.splitlines():
                return True
            if self.host.monotonic() >= deadline:
                return False
            self.host.sleep(0.01)

    def thaw(self, name: str) -> None:
        found = self._freezer(name)
        if found is not None:
            self.host.write_text(found[0], found[2])

    def thaw_all(self, skip: Iterable[str] = ()) -> list[str]:
        """Thaw every sliver group under our parent that is frozen (or freezing), but those in
        ``skip``; returns their names. A group that cannot be thawed is logged and left."""
        thawed = []
        for name in sorted({child for h in self.used() for child in self.children(h)} - set(skip)):
            found = self._freezer(name)
            if found is None or self.read(found[0]) == found[2]:
                continue
            try:
                self.host.write_text(found[0], found[2])
            except BackendError as exc:
                log.warning("event=thaw_failed sliver=%s error=%r", name, str(exc))
                continue
            thawed.append(name)
        return thawed


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
