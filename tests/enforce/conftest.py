"""FakeHosts for the enforcers: one whose commands answer with canned output (tc, nft, findmnt,
losetup...), and one that behaves like cgroupfs (memberships, cgroup.kill, the freezer)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from nodemanager.core.errors import BackendError
from nodemanager.enforce.cgroups import Hierarchy
from nodemanager.host import CommandResult
from nodemanager.testing.fakehost import FakeHost


class ScriptedHost(FakeHost):
    """``answers[tuple(argv prefix)] = (returncode, stdout)``; the longest matching prefix wins.
    Everything else behaves as FakeHost (exit 0, no output)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[tuple[str, ...], tuple[int, bytes]] = {}
        self.inputs: list[tuple[list[str], bytes | None]] = []

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60,
            check: bool = True) -> CommandResult[bytes]:
        result = super().run(argv, input=input, timeout=timeout, check=check)
        args = [str(a) for a in argv]
        self.inputs.append((args, input))
        best = max((p for p in self.answers if tuple(args[: len(p)]) == p), key=len, default=None)
        if best is None:
            return result
        code, out = self.answers[best]
        if check and code != 0:
            from nodemanager.core.errors import BackendError
            raise BackendError(f"{args[0]} exited with status {code}")
        return CommandResult(args, code, out, b"")

    def batches(self, program: str) -> list[bytes]:
        return [data or b"" for args, data in self.inputs if args[0] == program and data is not None]


@pytest.fixture
def host() -> ScriptedHost:
    return ScriptedHost()


class CgroupHost(FakeHost):
    """A FakeHost that behaves like cgroupfs for the hierarchies it is given: creating a group
    under one gives it its interface files; writing a pid to ``cgroup.procs`` moves the process
    (within that hierarchy); ``cgroup.procs`` and ``/proc/<pid>/cgroup`` are read from the
    memberships; ``cgroup.kill`` kills every member; ``freezer.state`` reaches FROZEN unless
    ``stuck_freezing``; a group with live members cannot be removed."""

    def __init__(self, hierarchies: Sequence[Hierarchy], *, cgroup_kill: bool = True) -> None:
        super().__init__()
        self.hierarchies = list(hierarchies)
        self.cgroup_kill = cgroup_kill
        self.stuck_freezing = False
        self.members: dict[Path, set[int]] = {}
        self.freezer: dict[Path, str] = {}
        lines = [f"cgroup2 {h.mount} cgroup2 rw 0 0" if h.version == 2 else
                 f"cgroup {h.mount} cgroup rw,{','.join(sorted(h.controllers))} 0 0" for h in self.hierarchies]
        self.add_file(Path("/proc/self/mounts"), ("\n".join(lines) + "\n").encode())
        for h in self.hierarchies:
            self.dirs[h.mount] = (0, 0, 0o755)
            if h.version == 2:
                self.add_file(h.mount / "cgroup.controllers", " ".join(sorted(h.controllers)).encode())

    def _hierarchy(self, group: Path) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.mount == group or h.mount in group.parents), None)

    def join(self, pid: int, group: Path) -> None:
        """Put ``pid`` in ``group`` (and out of its other groups of that hierarchy)."""
        h = self._hierarchy(group)
        for g, pids in self.members.items():
            if self._hierarchy(g) == h:
                pids.discard(pid)
        self.members.setdefault(group, set()).add(pid)

    def live(self, group: Path) -> list[int]:
        return sorted(p for p in self.members.get(group, set()) if p in self.processes)

    def makedirs_owned(self, path: Path, uid: int, gid: int, mode: int) -> None:
        super().makedirs_owned(path, uid, gid, mode)
        h = self._hierarchy(Path(path))
        if h is None or Path(path) == h.mount:
            return
        names = ["cgroup.procs"]
        if h.version == 2:
            names += ["cgroup.freeze", "cgroup.events"] + (["cgroup.kill"] if self.cgroup_kill else [])
        elif "freezer" in h.controllers:
            names.append("freezer.state")
        for name in names:
            if Path(path) / name not in self.files:
                self.add_file(Path(path) / name)

    def write_text(self, path: Path, text: str) -> None:
        path = Path(path)
        group = path.parent
        if path.name == "cgroup.procs" and self._hierarchy(group) is not None:
            self._record("write_text", path, text)
            pid = int(text)
            if pid not in self.processes:
                raise BackendError(f"cannot write {path}: No such process")
            self.join(pid, group)
        elif path.name == "cgroup.kill":
            self._record("write_text", path, text)
            for pid in self.live(group):
                if pid not in self.immortal:
                    del self.processes[pid]
        elif path.name == "freezer.state":
            self._record("write_text", path, text)
            self.freezer[group] = "FREEZING" if text == "FROZEN" and self.stuck_freezing else text
        else:
            super().write_text(path, text)

    def read_file(self, path: Path, *, limit: int = 1 << 20) -> bytes | None:
        path = Path(path)
        if path.name == "cgroup.procs" and self._hierarchy(path.parent) is not None and path in self.files:
            self._record("read_file", path)
            return "".join(f"{p}\n" for p in self.live(path.parent)).encode()
        if path.name == "freezer.state" and path in self.files:
            self._record("read_file", path)
            return (self.freezer.get(path.parent, "THAWED") + "\n").encode()
        if path.parts[:2] == ("/", "proc") and path.name == "cgroup" and path.parent.name.isdigit():
            self._record("read_file", path)
            pid = int(path.parent.name)
            if pid not in self.processes:
                return None
            lines = []
            for i, h in enumerate(self.hierarchies):
                where = next((g for g, pids in self.members.items() if pid in pids and self._hierarchy(g) == h), h.mount)
                rel = "/" + str(where.relative_to(h.mount)).lstrip(".")
                lines.append(f"0::{rel}" if h.version == 2 else f"{i + 1}:{','.join(sorted(h.controllers))}:{rel}")
            return ("\n".join(lines) + "\n").encode()
        return super().read_file(path, limit=limit)

    def remove_dir(self, path: Path) -> None:
        if self.live(Path(path)):
            self._record("remove_dir", Path(path))
            raise BackendError(f"cannot remove directory {path}: Device or resource busy")
        self.members.pop(Path(path), None)
        super().remove_dir(path)


V1 = [Hierarchy(Path("/cg/cpu"), 1, frozenset({"cpu"})), Hierarchy(Path("/cg/memory"), 1, frozenset({"memory"})),
      Hierarchy(Path("/cg/pids"), 1, frozenset({"pids"})), Hierarchy(Path("/cg/freezer"), 1, frozenset({"freezer"}))]
#: This project's machines: v1 controllers, a cgroup2 mount with none but with cgroup.kill.
HYBRID = [*V1, Hierarchy(Path("/cg/unified"), 2, frozenset({"hugetlb"}))]
#: Other hosts: everything in cgroup v2.
V2 = [Hierarchy(Path("/cg2"), 2, frozenset({"cpu", "memory", "pids", "io"}))]


@pytest.fixture(params=["v1", "hybrid", "v2"])
def cgroup_host(request: pytest.FixtureRequest) -> CgroupHost:
    """A cgroupfs-like FakeHost for each layout: pure v1 (freezer, no cgroup.kill), this
    machine's hybrid, pure v2."""
    return CgroupHost({"v1": V1, "hybrid": HYBRID, "v2": V2}[request.param])


@pytest.fixture
def make_cgroup_host():  # type: ignore[no-untyped-def]
    """``make_cgroup_host("v1"|"hybrid"|"v2", cgroup_kill=...)``."""
    return lambda layout, **kw: CgroupHost({"v1": V1, "hybrid": HYBRID, "v2": V2}[layout], **kw)
