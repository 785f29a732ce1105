"""KernelHost: a FakeHost that models the kernel objects resource enforcement manages.

It is :class:`~.cgroupfs.CgroupHost` (cgroups in the layout asked for, this project's hybrid by
default) plus :mod:`.net` (tc, nft, ip), :mod:`.disk` (images, loop devices, mounts, the
commands run as the sliver) and :mod:`.ipc` (SysV IPC), and the machine those live on: the
shared world-writable directories and the cron/at spools the leftovers sweep cleans, a mount
table (``/proc/self/mounts``, ``mounts()``, ``findmnt``) that holds the loop mounts, processes
with a working directory (a process started in a home keeps a mount there busy).

It models objects, not a call sequence: any correct sequence of commands ends in the right
state, a wrong one in the state the kernel would be left in. Files behave a little more like
the kernel's too: ``write_text`` cannot create a file, ``remove_dir`` removes only an empty
directory, and a mount point is never removed (``remove_tree`` fails on it, ``userdel
--remove`` exits 12), though what is under it is.

Commands the model does not know are not guessed at: they fail with status 127 and are listed in
:attr:`KernelHost.unmodelled` (the crash simulation's invariants require it empty). Programs that
are deliberately answered without a model are in :data:`NO_OPS`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ...core.errors import BackendError
from ...enforce.cgroups import Hierarchy
from ...host import CommandResult, FileInfo
from ..fakehost import FakeFile, below
from .cgroupfs import HYBRID, CgroupHost
from .disk import Storage
from .ipc import SysvIpc
from .net import Answer, Network, Unmodelled

#: Programs answered with success and no output, without a model: sshd's configuration test
#: (the sshd check is not enforcement; it reports "unknown settings" from an empty answer).
NO_OPS = frozenset({"sshd"})
ACCOUNT_COMMANDS = frozenset({"useradd", "usermod", "userdel", "groupadd", "groupdel"})
STORAGE_COMMANDS = frozenset({"truncate", "mkfs.ext4", "mv", "chown", "chmod", "losetup", "mount", "umount",
                              "findmnt", "resize2fs", "e2fsck", "stat", "find", "cp"})
#: Directories of the machine: (uid, gid, mode). The shared ones are world-writable (sticky).
MACHINE_DIRS: dict[Path, tuple[int, int, int]] = {
    Path("/"): (0, 0, 0o755), Path("/var"): (0, 0, 0o755), Path("/run"): (0, 0, 0o755),
    Path("/dev"): (0, 0, 0o755), Path("/tmp"): (0, 0, 0o1777), Path("/var/tmp"): (0, 0, 0o1777),
    Path("/dev/shm"): (0, 0, 0o1777), Path("/run/lock"): (0, 0, 0o1777), Path("/dev/mqueue"): (0, 0, 0o1777),
    Path("/var/spool"): (0, 0, 0o755), Path("/var/spool/cron"): (0, 0, 0o755),
    Path("/var/spool/cron/crontabs"): (0, 101, 0o1730), Path("/var/spool/cron/atjobs"): (1, 1, 0o1770),
}
SHARED_DIRS = tuple(p for p, (_, _, mode) in MACHINE_DIRS.items() if mode & 0o002)
SPOOL_DIRS = (Path("/var/spool/cron/crontabs"), Path("/var/spool/cron/atjobs"))


class KernelHost(CgroupHost):
    """The fake machine with its kernel objects (module docstring)."""

    def __init__(self, hierarchies: Sequence[Hierarchy] = HYBRID, *, cgroup_kill: bool = True,
                 uplink: str | None = "eth0") -> None:
        super().__init__(hierarchies, cgroup_kill=cgroup_kill)
        self.net = Network(uplink)
        self.storage = Storage(self)
        self.ipc = SysvIpc()
        #: pid -> working directory (programs started by ``spawn_detached`` run in the home).
        self.cwd: dict[int, Path] = {}
        #: Commands the model does not know (answered with status 127).
        self.unmodelled: list[str] = []
        self._caller = threading.local()
        for path, attrs in MACHINE_DIRS.items():
            self.dirs.setdefault(path, attrs)

    # --- the machine a test sets up (not effects of the node) -------------------------------------
    def add_process(self, uid: int, *, cwd: Path | None = None, cgroups: Sequence[Path] = ()) -> int:
        """A process of ``uid`` (a login, a job of cron), in ``cgroups`` (default: none of ours)."""
        pid = super().add_process(uid)
        if cwd is not None:
            self.cwd[pid] = Path(cwd)
        for group in cgroups:
            self.join(pid, Path(group))
        return pid

    def add_file(self, path: Path, data: bytes = b"", *, uid: int = 0, gid: int = 0, mode: int = 0o644) -> None:
        self.storage.forget(Path(path))
        super().add_file(path, data, uid=uid, gid=gid, mode=mode)

    # --- the mount table ---------------------------------------------------------------------------
    def mount_entries(self) -> list[tuple[str, str, str, str]]:
        base = super().mount_entries()
        base += [("tmpfs", "/dev/shm", "tmpfs", "rw,nosuid,nodev"), ("tmpfs", "/run", "tmpfs", "rw,nosuid,nodev"),
                 ("mqueue", "/dev/mqueue", "mqueue", "rw,nosuid,nodev,noexec,relatime")]
        return base + self.storage.entries()

    # --- commands ----------------------------------------------------------------------------------
    def _execute(self, args: list[str], input: bytes | None) -> tuple[int, bytes, str]:
        program = Path(args[0]).name
        caller = getattr(self._caller, "ids", None)
        try:
            if program in ACCOUNT_COMMANDS and caller is None:
                return self._account_command(args)
            if program in NO_OPS and caller is None:
                return 0, b"", ""
            if program in ("tc", "nft", "ip") and caller is None:
                return self.net.run(args, input)
            if program in STORAGE_COMMANDS:
                return self.storage.run(args, caller)
            if program == "ipcrm" and caller is None:
                return self.ipc.ipcrm(args[1:])
            raise Unmodelled(" ".join(args))
        except Unmodelled as exc:
            self.unmodelled.append(str(exc))
            return 127, b"", f"KernelHost does not model: {exc}"

    def _account_command(self, args: list[str]) -> Answer:
        entry = self.users.get(args[-1]) if args[0] == "userdel" else None
        points = self.storage.mount_points()
        returncode, stderr = self._effect(args)
        if returncode == 0 and entry is not None and "--remove" in args:
            home = Path(entry.home)
            if any(p == home or below(p, home) for p in points):
                return 12, b"", f"userdel: error removing directory {home}"
        return returncode, b"", stderr

    def run_as(self, argv: Sequence[str], *, uid: int, gid: int, groups: Sequence[int] = (), timeout: float = 60,
               check: bool = True) -> CommandResult[bytes]:
        if uid == 0:
            raise BackendError("run_as refuses uid 0")
        self._caller.ids = (uid, gid)
        try:
            return super().run_as(argv, uid=uid, gid=gid, groups=groups, timeout=timeout, check=check)
        finally:
            self._caller.ids = None

    # --- files: what a mount and the kernel's file system change -----------------------------------
    def read_file(self, path: Path, *, limit: int = 1 << 20) -> bytes | None:
        path = Path(path)
        if path.parent == Path("/proc/sysvipc") and path.name in ("shm", "msg", "sem"):
            self._record("read_file", path)
            return self.ipc.text(path.name)[:limit]
        return super().read_file(path, limit=limit)

    def stat_file(self, path: Path) -> FileInfo | None:
        info = super().stat_file(path)
        if info is None or Path(path) not in self.storage.volumes:
            return info
        volume = self.storage.volume(Path(path))
        return info if volume is None else replace(info, size=volume.size)

    def file_stamps(self, directory: Path) -> dict[str, tuple[int, int, int]]:
        stamps = super().file_stamps(directory)
        for name, (ino, size, mtime) in list(stamps.items()):
            volume = self.storage.volume(Path(directory) / name)
            if volume is not None:
                stamps[name] = (ino, volume.size, mtime)
        return stamps

    def atomic_write(self, path: Path, data: bytes, *, uid: int, gid: int, mode: int) -> None:
        self._record("atomic_write", Path(path), data, uid, gid, mode)
        if Path(path) in self.dirs:
            raise BackendError(f"cannot write {path}: Is a directory")
        self.storage.forget(Path(path))
        self.files[Path(path)] = FakeFile(bytes(data), uid, gid, mode, self._stamp())

    def write_text(self, path: Path, text: str) -> None:
        path = Path(path)
        if not self.is_group(path.parent) and path not in self.files:
            self._record("write_text", path, text)
            raise BackendError(f"cannot write {path}: No such file or directory")
        super().write_text(path, text)

    def remove_file(self, path: Path) -> None:
        self.storage.forget(Path(path))
        super().remove_file(path)

    def remove_dir(self, path: Path) -> None:
        path = Path(path)
        if self.is_group(path):
            super().remove_dir(path)
            return
        self._record("remove_dir", path)
        if path in self.storage.mount_points():
            raise BackendError(f"cannot remove directory {path}: Device or resource busy")
        if path in self.files:
            raise BackendError(f"cannot remove directory {path}: Not a directory")
        if any(p.parent == path for p in [*self.files, *self.dirs]):
            raise BackendError(f"cannot remove directory {path}: Directory not empty")
        self.dirs.pop(path, None)

    def remove_tree(self, path: Path) -> None:
        path = Path(path)
        self._record("remove_tree", path)
        kept = self._remove_under(path)
        if kept:
            raise BackendError(f"cannot remove {kept[0]}: Device or resource busy")

    def _remove_under(self, root: Path) -> list[Path]:  # type: ignore[override]
        """Remove ``root`` and everything below, except mount points (and the directories
        holding them): those are returned."""
        points = [p for p in self.storage.mount_points() if p == root or below(p, root)]
        keep = {q for p in points for q in [p, *p.parents]}
        for path in [p for p in self.files if p == root or below(p, root)]:
            del self.files[path]
            self.storage.forget(path)
        for path in [p for p in self.dirs if (p == root or below(p, root)) and p not in keep]:
            del self.dirs[path]
        return sorted(points)

    # --- processes -------------------------------------------------------------------------------
    def spawn_detached(self, argv: Sequence[str], *, uid: int, gid: int, home: Path, env: Mapping[str, str],
                       log_path: Path, cgroups: Sequence[Path] = (), groups: Sequence[int] | None = None) -> None:
        super().spawn_detached(argv, uid=uid, gid=gid, home=home, env=env, log_path=log_path, cgroups=cgroups,
                               groups=groups)
        self.cwd[self.spawned[-1].pid] = Path(home)
