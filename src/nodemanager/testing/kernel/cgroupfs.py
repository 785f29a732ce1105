"""cgroupfs as the kernel presents it: groups, their interface files, memberships, the freezer
and ``cgroup.kill``, on cgroup v1, v2 or a hybrid of both.

:class:`CgroupHost` is a :class:`~nodemanager.testing.fakehost.FakeHost` whose directories under
the mounted hierarchies behave like cgroups:

* making a directory there makes a group with the interface files of its hierarchy's
  controllers (on v2, of the controllers its parent enables in ``cgroup.subtree_control``);
  missing parents become groups too;
* writing a pid to ``cgroup.procs`` moves the process (it is in exactly one group of each
  hierarchy); ``cgroup.procs``, ``pids.current``, ``cgroup.events``, ``cgroup.controllers`` and
  ``/proc/<pid>/cgroup`` are read from the memberships; a process started by ``spawn_detached``
  with ``cgroups`` joins them (a missing group fails the start, as the child's write would);
* writes are checked and normalised as the kernel does (``cpu.shares`` clamped, memory limits
  rounded to pages, ``-1`` read back as v1's unlimited, ``EINVAL``/``ERANGE`` refused); a file the
  group does not have cannot be written (cgroupfs creates no files);
* ``cgroup.kill`` kills every member (descendants included, frozen ones too); ``freezer.state``
  reaches FROZEN unless ``stuck_freezing``; a group with live members or child groups cannot be
  removed; v2's "no internal processes" rule holds for groups that enable controllers.
* cpuset: a v1 group starts with blank ``cpuset.cpus``/``cpuset.mems`` and refuses tasks until
  both are set; a v1 child's CPUs stay within its parent's (a parent cannot drop a CPU a child
  holds); v2 groups inherit their parent's effective CPUs; the node has ``cpus`` CPUs.
* signals wait while a process is frozen by v1's freezer (FROZEN, not FREEZING): a SIGKILL sent
  then takes effect when its group is thawed, as on v1 kernels. (v2 lets a frozen task die.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ...core.cores import format_cpu_list, parse_cpu_list
from ...core.errors import BackendError
from ...enforce.cgroups import Hierarchy
from ...hostsweep import MOUNTS_FILE
from ..fakehost import FakeFile, FakeHost, children_of

V1 = [Hierarchy(Path("/cg/cpu"), 1, frozenset({"cpu"})), Hierarchy(Path("/cg/memory"), 1, frozenset({"memory"})),
      Hierarchy(Path("/cg/pids"), 1, frozenset({"pids"})), Hierarchy(Path("/cg/freezer"), 1, frozenset({"freezer"})),
      Hierarchy(Path("/cg/cpuset"), 1, frozenset({"cpuset"}))]
#: This project's machines: v1 controllers, a cgroup2 mount with none of ours but with cgroup.kill.
HYBRID = [*V1, Hierarchy(Path("/cg/unified"), 2, frozenset({"hugetlb"}))]
#: Other hosts: everything in cgroup v2.
V2 = [Hierarchy(Path("/cg2"), 2, frozenset({"cpu", "memory", "pids", "io", "cpuset"}))]
LAYOUTS = {"v1": V1, "hybrid": HYBRID, "v2": V2}

#: What v1 reads back for an unlimited memory limit (PAGE_COUNTER_MAX pages).
V1_UNLIMITED = 9223372036854771712
PAGE = 4096
PID_MAX_LIMIT = 4194304
#: Files whose content the kernel computes (never stored).
_COMPUTED = frozenset({"cgroup.procs", "tasks", "pids.current", "freezer.state", "cgroup.events",
                       "cgroup.controllers", "cgroup.subtree_control", "cpuset.effective_cpus",
                       "cpuset.cpus.effective"})
#: Interface files per controller and version, with their value in a new group.
_V1_FILES = {
    "cpu": {"cpu.shares": "1024"},
    "memory": {"memory.limit_in_bytes": str(V1_UNLIMITED), "memory.move_charge_at_immigrate": "0",
               "memory.usage_in_bytes": "0"},
    "pids": {"pids.max": "max", "pids.current": ""},
    "freezer": {"freezer.state": ""},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cpuset.effective_cpus": ""},
}
_V2_FILES = {
    "cpu": {"cpu.weight": "100"},
    "memory": {"memory.max": "max", "memory.current": "0"},
    "pids": {"pids.max": "max", "pids.current": ""},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cpuset.cpus.effective": ""},
}
#: Files the root group of a hierarchy does not have.
_NOT_IN_ROOT = frozenset({"pids.max", "pids.current", "freezer.state", "cgroup.events", "cgroup.freeze",
                          "cgroup.kill", "cpu.weight", "memory.max"})


def _refuse(path: Path, why: str) -> BackendError:
    return BackendError(f"cannot write {path}: {why}")


class CgroupHost(FakeHost):
    """A FakeHost whose hierarchies behave like cgroupfs (module docstring)."""

    def __init__(self, hierarchies: Sequence[Hierarchy] = HYBRID, *, cgroup_kill: bool = True,
                 cpus: int = 2) -> None:
        super().__init__()
        self.cpus = cpus
        self.hierarchies = list(hierarchies)
        self.cgroup_kill = cgroup_kill
        self.stuck_freezing = False
        #: group -> pids written into it (dead ones are filtered when read: ``live``).
        self.members: dict[Path, set[int]] = {}
        #: v1 ``freezer.state`` per group (THAWED when absent); v2 groups with ``cgroup.freeze`` 1.
        self.freezer: dict[Path, str] = {}
        self.frozen_v2: set[Path] = set()
        #: v2 ``cgroup.subtree_control`` per group.
        self.subtree: dict[Path, set[str]] = {}
        #: Signals sent to processes frozen by a v1 freezer, delivered when it thaws them.
        self.pending: dict[int, list[int]] = {}
        self._where: dict[Path, Hierarchy | None] = {}
        for h in self.hierarchies:
            self.dirs[h.mount] = (0, 0, 0o755)
            self._add_interface(h.mount, h)

    # --- the mount table --------------------------------------------------------------------
    def mount_entries(self) -> list[tuple[str, str, str, str]]:
        """``(source, mount point, type, options)`` of every mount, in mount order."""
        entries = [("/dev/vda1", "/", "ext4", "rw,relatime")]
        for h in self.hierarchies:
            if h.version == 2:
                entries.append(("cgroup2", str(h.mount), "cgroup2", "rw,relatime"))
            else:
                entries.append(("cgroup", str(h.mount), "cgroup", ",".join(["rw", "relatime", *sorted(h.controllers)])))
        return entries

    def mounts(self) -> list[tuple[str, str]]:
        self._record("mounts")
        return [(point, kind) for _, point, kind, _ in self.mount_entries()]

    # --- where a path is ----------------------------------------------------------------------
    def hierarchy_of(self, path: Path) -> Hierarchy | None:
        if not isinstance(path, Path):
            path = Path(path)
        if path not in self._where:  # asked for the same few paths again and again: remembered
            text = str(path)
            self._where[path] = next((h for h in self.hierarchies
                                      if text == str(h.mount) or text.startswith(f"{h.mount}/")), None)
        return self._where[path]

    _hierarchy = hierarchy_of  # the name tests used

    def is_group(self, path: Path) -> bool:
        return self.hierarchy_of(path) is not None and path in self.dirs

    def child_groups(self, group: Path) -> list[Path]:
        return sorted(d for d in children_of(self.dirs, group) if self.hierarchy_of(d) is not None)

    def _below(self, group: Path) -> list[Path]:
        """``group`` and every group under it."""
        prefix = f"{group}/"
        return [d for d in self.dirs if (d == group or str(d).startswith(prefix)) and self.hierarchy_of(d) is not None]

    # --- memberships --------------------------------------------------------------------------
    def join(self, pid: int, group: Path) -> None:
        """Put ``pid`` in ``group`` (and out of its other groups of that hierarchy)."""
        group = Path(group)
        h = self.hierarchy_of(group)
        for g, pids in self.members.items():
            if self.hierarchy_of(g) == h:
                pids.discard(pid)
        self.members.setdefault(group, set()).add(pid)

    def live(self, group: Path) -> list[int]:
        """Live processes in ``group`` itself (the root group: those in no other group)."""
        group = Path(group)
        h = self.hierarchy_of(group)
        if h is not None and group == h.mount:
            placed = {p for g, pids in self.members.items() if self.hierarchy_of(g) == h and g != group for p in pids}
            return sorted(p for p in self.processes if p not in placed)
        return sorted(p for p in self.members.get(group, set()) if p in self.processes)

    def live_below(self, group: Path) -> list[int]:
        return sorted({p for g in self._below(Path(group)) for p in self.live(g)})

    def group_of(self, pid: int, h: Hierarchy) -> Path:
        """The group of ``h`` that ``pid`` is in (the hierarchy's root when none)."""
        return next((g for g, pids in self.members.items() if pid in pids and self.hierarchy_of(g) == h
                     and g in self.dirs), h.mount)

    def is_frozen(self, group: Path) -> bool:
        """Whether the group is frozen (or freezing) by v1's freezer or v2's ``cgroup.freeze``."""
        return self.freezer.get(Path(group), "THAWED") != "THAWED" or Path(group) in self.frozen_v2

    # --- groups -------------------------------------------------------------------------------
    def _add_interface(self, group: Path, h: Hierarchy) -> None:
        root = group == h.mount
        files: dict[str, str] = {"cgroup.procs": ""}
        if h.version == 1:
            files["tasks"] = ""
            for controller in sorted(h.controllers):
                files.update(_V1_FILES.get(controller, {}))
        else:
            files.update({"cgroup.controllers": "", "cgroup.subtree_control": "", "cgroup.events": "",
                          "cgroup.freeze": "0"})
            if self.cgroup_kill:
                files["cgroup.kill"] = ""
            if not root:
                for controller in sorted(self.subtree.get(group.parent, set())):
                    files.update(_V2_FILES.get(controller, {}))
        if root and "cpuset" in h.controllers:  # the root cpuset: every CPU (v2: read-only, effective)
            files.update({"cpuset.cpus": f"0-{self.cpus - 1}", "cpuset.mems": "0"} if h.version == 1 else
                         {"cpuset.cpus.effective": ""})
        for name, value in files.items():
            if root and name in _NOT_IN_ROOT:
                continue
            if group / name not in self.files:
                self.files[group / name] = FakeFile(value.encode(), 0, 0, 0o644, self._stamp())

    def makedirs_owned(self, path: Path, uid: int, gid: int, mode: int) -> None:
        path = Path(path)
        h = self.hierarchy_of(path)
        if h is None or path == h.mount or path in self.dirs:
            super().makedirs_owned(path, uid, gid, mode)
            return
        self._record("makedirs_owned", path, uid, gid, mode)
        relative = path.relative_to(h.mount)
        chain = [h.mount / p for p in reversed(relative.parents) if p != Path(".")] + [path]
        for group in chain:
            if group not in self.dirs:
                self.dirs[group] = (uid, gid, mode)
                self._add_interface(group, h)
        self.dirs[path] = (uid, gid, mode)

    def remove_dir(self, path: Path) -> None:
        path = Path(path)
        if not self.is_group(path):
            super().remove_dir(path)
            return
        self._record("remove_dir", path)
        h = self.hierarchy_of(path)
        if h is not None and path == h.mount:
            raise BackendError(f"cannot remove directory {path}: Device or resource busy")
        if self.live(path) or self.child_groups(path):
            raise BackendError(f"cannot remove directory {path}: Device or resource busy")
        for p in children_of(self.files, path):
            del self.files[p]
        del self.dirs[path]
        self.members.pop(path, None)
        self.freezer.pop(path, None)
        self.frozen_v2.discard(path)
        self.subtree.pop(path, None)

    # --- interface files ----------------------------------------------------------------------
    def write_text(self, path: Path, text: str) -> None:
        path = Path(path)
        group = path.parent
        if not self.is_group(group):
            super().write_text(path, text)
            return
        self._record("write_text", path, text)
        h = self.hierarchy_of(group)
        assert h is not None
        if path not in self.files:
            raise _refuse(path, "No such file or directory")
        value = text.strip()
        name = path.name
        if name in ("cgroup.procs", "tasks"):
            self._write_procs(path, group, h, value)
        elif name == "cgroup.kill":
            if value != "1":
                raise _refuse(path, "Invalid argument")
            for pid in self.live_below(group):
                if pid not in self.immortal:
                    del self.processes[pid]
        elif name == "freezer.state":
            if value not in ("FROZEN", "THAWED"):
                raise _refuse(path, "Invalid argument")
            self.freezer[group] = "FREEZING" if value == "FROZEN" and self.stuck_freezing else value
            if value == "THAWED":
                for pid in self.live_below(group):
                    for sig in sorted(self.pending.pop(pid, []), reverse=True):  # SIGTERM (15) before SIGKILL (9)
                        if pid in self.processes:
                            super()._deliver(pid, sig)
        elif name == "cgroup.freeze":
            if value not in ("0", "1"):
                raise _refuse(path, "Invalid argument")
            (self.frozen_v2.add if value == "1" else self.frozen_v2.discard)(group)
        elif name == "cgroup.subtree_control":
            self._write_subtree(path, group, h, value)
        elif name in ("cpuset.cpus", "cpuset.mems"):
            self._write_cpuset(path, group, h, value)
        elif name in _COMPUTED or name.endswith((".current", ".events")) or name == "memory.usage_in_bytes":
            raise _refuse(path, "Permission denied")
        else:
            stored = _normalise(name, value)
            if stored is None:
                raise _refuse(path, "Invalid argument")
            self.files[path] = replace(self.files[path], data=stored.encode(), stamp=self._stamp())

    def _write_procs(self, path: Path, group: Path, h: Hierarchy, value: str) -> None:
        if not value.isdigit():
            raise _refuse(path, "Invalid argument")
        pid = int(value)
        if pid not in self.processes:
            raise _refuse(path, "No such process")
        if h.version == 2 and group != h.mount and self.subtree.get(group):
            raise _refuse(path, "Device or resource busy")  # no internal processes
        if h.version == 1 and "cpuset" in h.controllers and not (self.cpuset_of(group)
                                                                  and self.cpuset_of(group, "cpuset.mems")):
            raise _refuse(path, "No space left on device")  # a v1 cpuset without CPUs or memory nodes
        self.join(pid, group)

    def _write_cpuset(self, path: Path, group: Path, h: Hierarchy, value: str) -> None:
        try:
            wanted = set(parse_cpu_list(value))
        except ValueError:
            raise _refuse(path, "Invalid argument") from None
        limit = self.cpus if path.name == "cpuset.cpus" else 1
        if group == h.mount or any(c >= limit for c in wanted):
            raise _refuse(path, "Invalid argument" if group != h.mount else "Permission denied")
        if h.version == 1:
            if not wanted <= set(self.cpuset_of(group.parent, path.name)):
                raise _refuse(path, "Invalid argument")  # not within the parent's
            if any(not set(self.cpuset_of(child, path.name)) <= wanted for child in self.child_groups(group)):
                raise _refuse(path, "Device or resource busy")  # a child holds a CPU being dropped
            if not wanted and self.live(group):
                raise _refuse(path, "No space left on device")
        self.files[path] = replace(self.files[path], data=format_cpu_list(wanted).encode(), stamp=self._stamp())

    def cpuset_of(self, group: Path, knob: str = "cpuset.cpus") -> tuple[int, ...]:
        """The CPUs (or memory nodes) a group may use: v1 its own list; v2 its own list within
        its parent's (the parent's when blank); a hierarchy root: all of them."""
        group = Path(group)
        h = self.hierarchy_of(group)
        assert h is not None
        every = tuple(range(self.cpus if knob == "cpuset.cpus" else 1))
        if group == h.mount:
            return every
        data = self.files.get(group / knob)
        own = parse_cpu_list(data.data.decode()) if data is not None else ()
        if h.version == 1:
            return own
        inherited = self.cpuset_of(group.parent, knob)
        return tuple(c for c in own if c in inherited) or inherited

    def _write_subtree(self, path: Path, group: Path, h: Hierarchy, value: str) -> None:
        available = self._controllers(group, h)
        wanted = set(self.subtree.get(group, set()))
        for token in value.split():
            controller = token[1:]
            if token[:1] not in "+-" or controller not in available:
                raise _refuse(path, "No such file or directory")
            (wanted.add if token[0] == "+" else wanted.discard)(controller)
        if wanted and group != h.mount and self.live(group):
            raise _refuse(path, "Device or resource busy")  # no internal processes
        added = wanted - self.subtree.get(group, set())
        self.subtree[group] = wanted
        for child in self.child_groups(group):
            for controller in sorted(added):
                for name, initial in _V2_FILES.get(controller, {}).items():
                    if child / name not in self.files:
                        self.files[child / name] = FakeFile(initial.encode(), 0, 0, 0o644, self._stamp())

    def _controllers(self, group: Path, h: Hierarchy) -> set[str]:
        return set(h.controllers) if group == h.mount else set(self.subtree.get(group.parent, set()))

    def read_file(self, path: Path, *, limit: int = 1 << 20) -> bytes | None:
        path = Path(path)
        if path == MOUNTS_FILE:
            self._record("read_file", path)
            text = "".join(f"{src} {_escape(point)} {kind} {options} 0 0\n"
                           for src, point, kind, options in self.mount_entries())
            return text.encode()[:limit]
        if self.is_group(path.parent) and path in self.files and path.name in _COMPUTED:
            self._record("read_file", path)
            return self._computed(path.parent, path.name).encode()[:limit]
        if path.parts[:2] == ("/", "proc") and path.name == "cgroup" and path.parent.name.isdigit():
            self._record("read_file", path)
            pid = int(path.parent.name)
            if pid not in self.processes:
                return None
            lines = []
            for i, h in enumerate(self.hierarchies):
                where = self.group_of(pid, h)
                rel = "/" + str(where.relative_to(h.mount)).lstrip(".")
                lines.append(f"0::{rel}" if h.version == 2 else f"{i + 1}:{','.join(sorted(h.controllers))}:{rel}")
            return ("\n".join(lines) + "\n").encode()
        return super().read_file(path, limit=limit)

    def _computed(self, group: Path, name: str) -> str:
        h = self.hierarchy_of(group)
        assert h is not None
        if name in ("cgroup.procs", "tasks"):
            return "".join(f"{p}\n" for p in self.live(group))
        if name == "pids.current":
            return f"{len(self.live_below(group))}\n"
        if name == "freezer.state":
            return self.freezer.get(group, "THAWED") + "\n"
        if name == "cgroup.events":
            return f"populated {int(bool(self.live_below(group)))}\nfrozen {int(group in self.frozen_v2)}\n"
        if name == "cgroup.controllers":
            return " ".join(sorted(self._controllers(group, h))) + "\n"
        if name in ("cpuset.effective_cpus", "cpuset.cpus.effective"):
            return format_cpu_list(self.cpuset_of(group)) + "\n"
        return " ".join(sorted(self.subtree.get(group, set()))) + "\n"

    # --- processes ----------------------------------------------------------------------------
    def _deliver(self, pid: int, sig: int) -> None:
        frozen = any(self.freezer.get(self.group_of(pid, h)) == "FROZEN"
                     for h in self.hierarchies if h.version == 1 and "freezer" in h.controllers)
        if frozen:
            self.pending.setdefault(pid, []).append(sig)
        else:
            super()._deliver(pid, sig)

    def spawn_detached(self, argv: Sequence[str], *, uid: int, gid: int, home: Path, env: Mapping[str, str],
                       log_path: Path, cgroups: Sequence[Path] = (), groups: Sequence[int] | None = None) -> None:
        missing = [Path(c) for c in cgroups if not self.is_group(Path(c))]
        if missing:
            self._record("spawn_detached", tuple(argv), uid)
            raise BackendError(f"cannot start {argv[0]}: setsid exited with status 1 (no cgroup {missing[0]})")
        empty = [Path(c) for c in cgroups if (h := self.hierarchy_of(Path(c))) is not None and h.version == 1
                 and "cpuset" in h.controllers and not self.cpuset_of(Path(c))]
        if empty:
            self._record("spawn_detached", tuple(argv), uid)
            raise BackendError(f"cannot start {argv[0]}: setsid exited with status 1 (cpuset {empty[0]} has no CPUs)")
        super().spawn_detached(argv, uid=uid, gid=gid, home=home, env=env, log_path=log_path, cgroups=cgroups,
                               groups=groups)
        pid = self.spawned[-1].pid
        for group in cgroups:
            self.join(pid, Path(group))


def _escape(point: str) -> str:
    """A mount point as ``/proc/self/mounts`` writes it (octal escapes of blanks)."""
    return point.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def _normalise(name: str, value: str) -> str | None:
    """What the kernel stores for ``value`` written to ``name``; None when it refuses it."""
    number = int(value) if value.isdigit() else None
    if name == "cpu.shares":
        return None if number is None else str(min(262144, max(2, number)))
    if name == "cpu.weight":
        return None if number is None or not 1 <= number <= 10000 else str(number)
    if name == "memory.max":
        return "max" if value == "max" else None if number is None else str(number // PAGE * PAGE)
    if name == "memory.limit_in_bytes":
        if value == "-1":
            return str(V1_UNLIMITED)
        return None if number is None else str(min(V1_UNLIMITED, number // PAGE * PAGE))
    if name == "memory.move_charge_at_immigrate":
        return None if number is None or number > 3 else str(number)
    if name == "pids.max":
        return "max" if value == "max" else None if number is None or number > PID_MAX_LIMIT else str(number)
    return value
