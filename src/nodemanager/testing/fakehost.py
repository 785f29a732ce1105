"""A hand-written recording fake of :class:`nodemanager.host.Host`.

It overrides every public method of ``Host`` (a test pins that), so nothing reaches the machine.
It keeps just enough state for backend logic to be tested without root:

* ``calls``: every method call in order, as ``(method, *arguments)`` tuples; ``commands``: the argv
  lists given to ``run``.
* an in-memory passwd/group/shadow table that ``useradd``, ``usermod``, ``userdel`` and
  ``groupdel`` argv lists update (the options the account backend uses, nothing more);
* ``dirs`` and ``files`` (path -> ``FakeFile``) for the file methods; every write gives a file a
  new ``stamp`` (its inode and mtime stand-in), and ``mount_table`` is what ``mounts`` returns;
* ``run_as`` records ``(uid, gid, groups, argv)`` in ``ran_as`` and otherwise behaves like ``run``;
* ``processes`` (pid -> uid): ``spawn_detached`` adds one, SIGTERM ends it unless the pid is in
  ``ignore_term``, SIGKILL ends it unless it is in ``immortal``; ``signal_pids`` skips a pid
  whose owner is not the ``uid`` asked for (what the pidfd check does for a reused pid);
* ``open_proc_events`` returns a :class:`FakeProcEvents` a test pushes connector messages into;
* a manual clock: ``sleep`` advances ``monotonic``;
* failures on cue: ``fail_next("useradd")`` makes the next ``useradd`` command fail,
  ``fail_next("makedirs_owned")`` the next call of that method; ``run_shell`` (``conf_files``
  commands) records ``("run_shell", command)`` and fails a command line given to ``fail_next``.

Every other command succeeds with no output; :class:`nodemanager.testing.kernel.KernelHost`
answers them (``_execute``) from a model of the kernel objects enforcement manages.
"""

from __future__ import annotations

import queue
import signal
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.errors import BackendError
from ..enforce.procevents import ack_for
from ..host import CommandResult, FileInfo, GroupEntry, Host, PasswdEntry, ShadowEntry, ShellResult


@dataclass(frozen=True, slots=True)
class FakeFile:
    data: bytes
    uid: int
    gid: int
    mode: int
    stamp: int = 0


@dataclass(frozen=True, slots=True)
class Spawned:
    argv: tuple[str, ...]
    uid: int
    gid: int
    home: Path
    env: dict[str, str]
    log_path: Path
    pid: int
    cgroups: tuple[Path, ...] = ()
    groups: tuple[int, ...] = ()


class FakeProcEvents:
    """What ``FakeHost.open_proc_events`` returns: a test ``push``es connector messages (see
    ``enforce.procevents.event_message``); every message sent is kept in ``sent`` and, with
    ``acknowledge``, answered with the kernel's acknowledgement."""

    LOST = b""

    def __init__(self, *, acknowledge: bool = True) -> None:
        self.acknowledge = acknowledge
        self.sent: list[bytes] = []
        self.closed = False
        self._queue: queue.Queue[bytes] = queue.Queue()

    def push(self, message: bytes) -> None:
        self._queue.put(message)

    def send(self, message: bytes) -> None:
        if self.closed:
            raise BackendError("channel closed")
        self.sent.append(message)
        if self.acknowledge:
            self._queue.put(ack_for(message))

    def recv(self, timeout: float) -> bytes | None:
        if self.closed:
            raise BackendError("channel closed")
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


@dataclass(slots=True)
class _Failure:
    returncode: int
    stderr: str
    times: int


class FakeHost(Host):
    def __init__(self, *, first_uid: int = 1000) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.commands: list[list[str]] = []
        self.users: dict[str, PasswdEntry] = {"root": PasswdEntry("root", 0, 0, "root", "/root", "/bin/sh")}
        self.groups: dict[str, GroupEntry] = {"root": GroupEntry("root", 0)}
        self.shadow: dict[str, ShadowEntry] = {"root": ShadowEntry("root", "*", "")}
        self.dirs: dict[Path, tuple[int, int, int]] = {}
        self.files: dict[Path, FakeFile] = {}
        self.processes: dict[int, int] = {}
        self.ignore_term: set[int] = set()
        self.immortal: set[int] = set()
        self.spawned: list[Spawned] = []
        #: ``open_proc_events`` channels, newest last; subscriptions are acknowledged unless False.
        self.proc_channels: list[FakeProcEvents] = []
        self.proc_events_ack = True
        self.ran_as: list[tuple[int, int, tuple[int, ...], tuple[str, ...]]] = []
        self.mount_table: list[tuple[str, str]] = [("/", "ext4")]
        self._next_stamp = 1
        self.now = 1000.0
        self._next_uid = first_uid
        self._next_pid = 5000
        self._failures: dict[str, _Failure] = {}

    # --- test controls --------------------------------------------------------------------
    def fail_next(self, what: str, *, returncode: int = 1, stderr: str = "injected failure", times: int = 1) -> None:
        """Fail the next ``times`` commands whose argv[0] is ``what``, or calls of method ``what``."""
        self._failures[what] = _Failure(returncode, stderr, times)

    def add_user(self, name: str, uid: int | None = None, *, gecos: str = "", home: str = "",
                 password: str = "*") -> PasswdEntry:
        """Put an account in the table directly, as if made by someone else."""
        if uid is None:
            uid = self._allocate_uid()
        entry = PasswdEntry(name, uid, uid, gecos, home or f"/home/{name}", "/bin/sh")
        self.users[name] = entry
        self.groups[name] = GroupEntry(name, uid)
        self.shadow[name] = ShadowEntry(name, password, "")
        return entry

    def add_file(self, path: Path, data: bytes = b"", *, uid: int = 0, gid: int = 0, mode: int = 0o644) -> None:
        """Put a file in the table directly, as if written by someone else."""
        self.files[Path(path)] = FakeFile(bytes(data), uid, gid, mode, self._stamp())

    def _stamp(self) -> int:
        self._next_stamp += 1
        return self._next_stamp

    def add_process(self, uid: int) -> int:
        self._next_pid += 1
        self.processes[self._next_pid] = uid
        return self._next_pid

    def commands_named(self, program: str) -> list[list[str]]:
        return [argv for argv in self.commands if argv and argv[0] == program]

    def method_calls(self, method: str) -> list[tuple[object, ...]]:
        return [call for call in self.calls if call[0] == method]

    def _maybe_fail(self, what: str) -> _Failure | None:
        failure = self._failures.get(what)
        if failure is None:
            return None
        failure.times -= 1
        if failure.times <= 0:
            del self._failures[what]
        return failure

    def _record(self, method: str, *args: object) -> None:
        self.calls.append((method, *args))
        failure = self._maybe_fail(method)
        if failure is not None:
            raise BackendError(f"{method}: {failure.stderr}")

    def _allocate_uid(self) -> int:
        used = {u.uid for u in self.users.values()} | {g.gid for g in self.groups.values()}
        while self._next_uid in used:
            self._next_uid += 1
        return self._next_uid

    # --- commands -------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60,
            check: bool = True) -> CommandResult[bytes]:
        args = [str(a) for a in argv]
        self.calls.append(("run", tuple(args)))
        self.commands.append(args)
        failure = self._maybe_fail(args[0])
        if failure is not None:
            returncode, stdout, stderr = failure.returncode, b"", failure.stderr
        else:
            returncode, stdout, stderr = self._execute(args, input)
        if check and returncode != 0:
            raise BackendError(f"{args[0]} exited with status {returncode}: {stderr or '(no stderr)'}")
        return CommandResult(args, returncode, stdout, stderr.encode())

    def run_shell(self, command: str, *, timeout: float, output_limit: int = 64 * 1024) -> ShellResult:
        """Records the command; ``fail_next(COMMAND)`` makes that exact command line exit with
        the failure's status (``stderr`` as its output). Everything else exits 0, silently."""
        self.calls.append(("run_shell", command))
        failure = self._maybe_fail(command)
        if failure is None:
            return ShellResult(0, False, b"")
        return ShellResult(failure.returncode, False, failure.stderr.encode()[:output_limit])

    def _execute(self, args: list[str], input: bytes | None) -> tuple[int, bytes, str]:
        """What a command does and answers: ``(returncode, stdout, stderr)``. Here the account
        commands of :meth:`_effect`, and exit 0 with no output for anything else; a machine model
        (``testing.kernel``) answers more."""
        returncode, stderr = self._effect(args)
        return returncode, b"", stderr

    def _effect(self, args: list[str]) -> tuple[int, str]:
        program, name = args[0], args[-1]
        options = _options(args[1:-1])
        if program == "useradd":
            if name in self.users:
                return 9, f"useradd: user '{name}' already exists"
            if "--user-group" in options and name in self.groups:
                return 9, f"useradd: group {name} exists"
            if "--uid" in options:
                uid = int(options["--uid"])
                if any(u.uid == uid for u in self.users.values()):
                    return 4, f"useradd: UID {uid} is not unique"
            else:
                uid = self._allocate_uid()
            wanted = [g for g in options.get("--groups", "").split(",") if g]
            missing = [g for g in wanted if g not in self.groups]
            if missing:
                return 6, f"useradd: group '{missing[0]}' does not exist"
            # Like shadow's useradd: the user group's gid comes from [GID_MIN, GID_MAX] (login.defs,
            # or ``--key``); without keys this fake prefers the uid's number when it is free.
            keys = dict(v.split("=", 1) for k, v in zip(args, args[1:]) if k == "--key" and "=" in v)
            used = {g.gid for g in self.groups.values()}
            if "GID_MIN" in keys and "GID_MAX" in keys:
                free = [g for g in range(int(keys["GID_MIN"]), int(keys["GID_MAX"]) + 1) if g not in used]
                if not free:
                    return 4, "useradd: can't create group: no more available GIDs"
                gid = free[0]
            else:
                gid = uid if uid not in used else self._allocate_uid()
            home = options.get("--home-dir", f"/home/{name}")
            self.users[name] = PasswdEntry(name, uid, gid, options.get("--comment", ""), home,
                                           options.get("--shell", "/bin/sh"))
            self.groups[name] = GroupEntry(name, gid)
            self.shadow[name] = ShadowEntry(name, options.get("--password", "!"), "")
            self._set_memberships(name, wanted, only=False)
            return 0, ""
        if program == "usermod":
            if name not in self.users:
                return 6, f"usermod: user '{name}' does not exist"
            old = self.shadow[name]
            self.shadow[name] = replace(old, password=options.get("--password", old.password),
                                        expire=options.get("--expiredate", old.expire))
            if "--groups" in options:
                wanted = [g for g in options["--groups"].split(",") if g]
                if any(g not in self.groups for g in wanted):
                    return 6, "usermod: group does not exist"
                self._set_memberships(name, wanted, only=True)
            return 0, ""
        if program == "groupadd":
            if name in self.groups:
                return 9, f"groupadd: group '{name}' already exists"
            self.groups[name] = GroupEntry(name, self._allocate_uid())
            return 0, ""
        if program == "userdel":
            entry = self.users.pop(name, None)
            if entry is None:
                return 6, f"userdel: user '{name}' does not exist"
            self.shadow.pop(name, None)
            group = self.groups.get(name)
            if group is not None and group.gid == entry.gid:
                del self.groups[name]
            if "--remove" in options:
                self._remove_under(Path(entry.home))
            return 0, ""
        if program == "groupdel":
            if self.groups.pop(name, None) is None:
                return 6, f"groupdel: group '{name}' does not exist"
            return 0, ""
        return 0, ""

    def _set_memberships(self, account: str, wanted: Sequence[str], *, only: bool) -> None:
        """Add ``account`` to the member lists of ``wanted``; with ``only``, remove it from all others."""
        for group in list(self.groups.values()):
            members = [m for m in group.members if m != account]
            if group.name in wanted:
                members.append(account)
            elif not only:
                members = list(group.members)
            self.groups[group.name] = replace(group, members=tuple(members))

    def run_as(self, argv: Sequence[str], *, uid: int, gid: int, groups: Sequence[int] = (), timeout: float = 60,
               check: bool = True) -> CommandResult[bytes]:
        if uid == 0:
            raise BackendError("run_as refuses uid 0")
        self.ran_as.append((uid, gid, tuple(groups), tuple(str(a) for a in argv)))
        return self.run(argv, timeout=timeout, check=check)

    # --- account databases ----------------------------------------------------------------
    def getpwnam(self, name: str) -> PasswdEntry | None:
        self._record("getpwnam", name)
        return self.users.get(name)

    def getpwuid(self, uid: int) -> PasswdEntry | None:
        self._record("getpwuid", uid)
        return next((u for u in self.users.values() if u.uid == uid), None)

    def all_users(self) -> list[PasswdEntry]:
        self._record("all_users")
        return list(self.users.values())

    def getgrnam(self, name: str) -> GroupEntry | None:
        self._record("getgrnam", name)
        return self.groups.get(name)

    def getgrgid(self, gid: int) -> GroupEntry | None:
        self._record("getgrgid", gid)
        return next((g for g in self.groups.values() if g.gid == gid), None)

    def all_groups(self) -> list[GroupEntry]:
        self._record("all_groups")
        return list(self.groups.values())

    def shadow_entry(self, name: str) -> ShadowEntry | None:
        self._record("shadow_entry", name)
        return self.shadow.get(name)

    def shadow_entries(self) -> dict[str, ShadowEntry]:
        self._record("shadow_entries")
        return dict(self.shadow)

    # --- files ----------------------------------------------------------------------------
    def makedirs_owned(self, path: Path, uid: int, gid: int, mode: int) -> None:
        self._record("makedirs_owned", Path(path), uid, gid, mode)
        self.dirs[Path(path)] = (uid, gid, mode)

    def atomic_write(self, path: Path, data: bytes, *, uid: int, gid: int, mode: int) -> None:
        self._record("atomic_write", Path(path), data, uid, gid, mode)
        self.files[Path(path)] = FakeFile(bytes(data), uid, gid, mode, self._stamp())

    def inspect_below(self, root: Path, parts: Sequence[str], *, limit: int) -> tuple[FileInfo, bytes | None] | None:
        path = Path(root).joinpath(*parts)
        self._record("inspect_below", path)
        f = self.files.get(path)
        if f is None:
            return None
        return FileInfo(f.uid, f.gid, f.mode, "file", len(f.data), f.stamp, f.stamp), (
            f.data if len(f.data) <= limit else None)

    def write_below(self, root: Path, parts: Sequence[str], data: bytes, *, uid: int, gid: int, mode: int,
                    dir_mode: int = 0o755) -> None:
        path = Path(root).joinpath(*parts)
        self._record("write_below", path, data, uid, gid, mode)
        self.files[path] = FakeFile(bytes(data), uid, gid, mode, self._stamp())

    def stat_file(self, path: Path) -> FileInfo | None:
        self._record("stat_file", Path(path))
        path = Path(path)
        if path in self.files:
            f = self.files[path]
            return FileInfo(f.uid, f.gid, f.mode, "file", len(f.data), f.stamp, f.stamp)
        if path in self.dirs:
            uid, gid, mode = self.dirs[path]
            return FileInfo(uid, gid, mode, "dir", 4096)
        return None

    def read_file(self, path: Path, *, limit: int = 1 << 20) -> bytes | None:
        self._record("read_file", Path(path))
        f = self.files.get(Path(path))
        return None if f is None else f.data[:limit]

    def remove_file(self, path: Path) -> None:
        self._record("remove_file", Path(path))
        self.files.pop(Path(path), None)

    def remove_tree(self, path: Path) -> None:
        self._record("remove_tree", Path(path))
        self._remove_under(Path(path))

    def _remove_under(self, root: Path) -> None:
        for table in (self.files, self.dirs):
            for path in [p for p in table if p == root or below(p, root)]:
                del table[path]

    def write_text(self, path: Path, text: str) -> None:
        self._record("write_text", Path(path), text)
        old = self.files.get(Path(path))
        self.files[Path(path)] = (FakeFile(text.encode(), 0, 0, 0o644, self._stamp()) if old is None
                                  else replace(old, data=text.encode(), stamp=self._stamp()))

    def remove_dir(self, path: Path) -> None:
        self._record("remove_dir", Path(path))
        self._remove_under(Path(path))

    def list_dirs(self, directory: Path) -> list[str]:
        self._record("list_dirs", Path(directory))
        return sorted(p.name for p in children_of(self.dirs, directory))

    def list_executables(self, directory: Path) -> list[str]:
        self._record("list_executables", Path(directory))
        return sorted(p.name for p in children_of(self.files, directory) if self.files[p].mode & 0o111)

    def file_stamps(self, directory: Path) -> dict[str, tuple[int, int, int]]:
        self._record("file_stamps", Path(directory))
        return {p.name: (self.files[p].stamp, len(self.files[p].data), self.files[p].stamp)
                for p in children_of(self.files, directory)}

    def mounts(self) -> list[tuple[str, str]]:
        self._record("mounts")
        return list(self.mount_table)

    def remove_owned(self, directory: Path, uid: int) -> tuple[int, int]:
        self._record("remove_owned", Path(directory), uid)
        root = Path(directory)
        files = [p for p, f in self.files.items() if f.uid == uid and below(p, root)]
        dirs = [p for p, (owner, _, _) in self.dirs.items() if owner == uid and below(p, root)]
        for path in files:
            del self.files[path]
        left = 0
        for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            if any(below(p, path) for p in [*self.files, *self.dirs]):
                left += 1
            else:
                del self.dirs[path]
        return len(files) + len(dirs) - left, left

    # --- processes ------------------------------------------------------------------------
    def pids_of_uid(self, uid: int) -> list[int]:
        self._record("pids_of_uid", uid)
        return sorted(pid for pid, owner in self.processes.items() if owner == uid)

    def pids_by_uid(self, uids: Collection[int]) -> dict[int, list[int]]:
        self._record("pids_by_uid", tuple(uids))
        return {uid: sorted(p for p, owner in self.processes.items() if owner == uid) for uid in uids}

    def kill(self, pid: int, sig: int, *, uid: int | None = None) -> None:
        self._record("kill", pid, sig)
        if pid <= 1:
            raise BackendError(f"refusing to signal pid {pid}")
        if pid not in self.processes or (uid is not None and self.processes[pid] != uid):
            return
        self._deliver(pid, sig)

    def signal_pids(self, pids: Iterable[int], sig: int, *, uid: int | None = None,
                    check: Callable[[int], bool] | None = None) -> int:
        pids = [int(p) for p in pids]
        self._record("signal_pids", tuple(pids), sig, uid)
        sent = 0
        for pid in pids:
            if pid <= 1 or pid not in self.processes:
                continue
            if uid is not None and self.processes[pid] != uid:
                continue  # the pid now belongs to someone else: a pidfd check refuses it
            if check is not None and not check(pid):
                continue
            sent += 1
            self._deliver(pid, sig)
        return sent

    def _deliver(self, pid: int, sig: int) -> None:
        """What a signal does to a live process: SIGKILL ends it unless ``immortal``, SIGTERM
        unless it is also in ``ignore_term``."""
        if sig == signal.SIGKILL and pid not in self.immortal:
            del self.processes[pid]
        elif sig == signal.SIGTERM and pid not in self.ignore_term and pid not in self.immortal:
            del self.processes[pid]

    def open_proc_events(self) -> FakeProcEvents:  # type: ignore[override]
        self._record("open_proc_events")
        channel = FakeProcEvents(acknowledge=self.proc_events_ack)
        self.proc_channels.append(channel)
        return channel

    def spawn_detached(self, argv: Sequence[str], *, uid: int, gid: int, home: Path,
                       env: Mapping[str, str], log_path: Path, cgroups: Sequence[Path] = (),
                       groups: Sequence[int] | None = None) -> None:
        self._record("spawn_detached", tuple(argv), uid, *([tuple(Path(c) for c in cgroups)] if cgroups else []))
        pid = self.add_process(uid)
        self.spawned.append(Spawned(tuple(str(a) for a in argv), uid, gid, Path(home), dict(env), Path(log_path), pid,
                                    tuple(Path(c) for c in cgroups), tuple([gid] if groups is None else groups)))

    # --- time -----------------------------------------------------------------------------
    def sleep(self, seconds: float) -> None:
        self.calls.append(("sleep", seconds))
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


class ShellAwareFakeHost(FakeHost):
    """FakeHost whose ``usermod --shell`` changes the passwd entry (FakeHost only models the
    password and expiry options of usermod): for tests of delegate accounts, whose login shell
    the backend switches between the wrapper and the ordinary shell."""

    def _effect(self, args: list[str]) -> tuple[int, str]:
        if args[0] == "usermod" and "--shell" in args and args[-1] in self.users:
            entry = self.users[args[-1]]
            self.users[args[-1]] = PasswdEntry(entry.name, entry.uid, entry.gid, entry.gecos, entry.home,
                                               args[args.index("--shell") + 1])
        return super()._effect(args)


def below(path: Path, root: Path) -> bool:
    """``path`` is strictly under ``root`` (compared as text: ``root in path.parents`` costs a
    Path object per level, and the fakes ask it for every entry they hold)."""
    return str(path).startswith(str(root).rstrip("/") + "/")


def children_of(table: Mapping[Path, object], directory: Path) -> list[Path]:
    """The paths of ``table`` directly in ``directory`` (by their text: thousands of worlds are
    listed in the crash simulation, and ``Path.parent`` makes a new object each time)."""
    prefix = str(directory).rstrip("/") + "/"
    cut = len(prefix)
    return [p for p in table if (text := str(p)).startswith(prefix) and "/" not in text[cut:] and len(text) > cut]


def _options(args: Sequence[str]) -> dict[str, str]:
    """``--opt value`` pairs and bare ``--flag``s of the commands above (value "" for a flag)."""
    flags = {"--user-group", "--no-create-home", "--remove", "--create-home", "--system", "--non-unique",
             "--no-log-init"}
    result: dict[str, str] = {}
    i = 0
    while i < len(args):
        if args[i] in flags or i + 1 >= len(args):
            result[args[i]] = ""
            i += 1
        else:
            result[args[i]] = args[i + 1]
            i += 2
    return result
