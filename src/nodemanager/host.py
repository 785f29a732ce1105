"""The one seam for operating-system effects.

Backends never call ``subprocess``, ``pwd``, ``grp`` or path-based file functions themselves: they
ask a :class:`Host`. That gives one place to get the dangerous parts right, and one object that
tests replace with :class:`nodemanager.testing.fakehost.FakeHost`.

The dangerous parts:

* Commands are argument lists, never shell strings, run with a fixed ``PATH`` and ``LC_ALL=C``.
  Every failure (non-zero exit, missing program, timeout, ``OSError``) becomes a
  :class:`~nodemanager.core.errors.BackendError` carrying the tail of the command's stderr.
* A sliver owns its home, so it may plant symbolic links there (``~/.ssh/authorized_keys ->
  /etc/passwd``). Every file operation here walks the path one component at a time with
  ``O_NOFOLLOW`` and works on directory file descriptors. A symbolic link is followed only when the
  directory holding it is owned by root and writable by nobody else (so only root could have put
  it there, e.g. ``/home -> /srv/home``); any other link is refused, and a link in the final
  position is replaced, never written through. That code lives in :mod:`nodemanager.hostfiles`
  (:class:`~nodemanager.hostfiles.LinkSafeFiles`, which ``Host`` inherits).
* Processes are found by a ``/proc`` scan and signalled through pidfds after checking they are
  still the process meant (:mod:`nodemanager.hostprocs`), so a reused pid is never hit; zombies
  are skipped (they cannot be killed and would keep a stop loop spinning), and pid 0/1 are never
  signalled.
* Detached programs are started through util-linux ``setsid --fork`` after privileges are dropped,
  so the daemon never becomes their parent: it has nothing to reap and restarting it leaves
  sliver processes alone.

All methods may be called from any thread.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import forkguard
from .core.errors import BackendError
from .hostconfined import ConfinedFiles
from .hostfiles import READ_LIMIT, FileInfo, LinkSafeFiles
from .hostfiles import describe_oserror as _describe
from .hostprocs import ProcEventChannel, process_ids, signal_through_pidfd
from .hostshell import ShellResult, run_shell_command

__all__ = [
    "COMMAND_ENV",
    "READ_LIMIT",
    "STDERR_TAIL",
    "CommandResult",
    "FileInfo",
    "GroupEntry",
    "Host",
    "PasswdEntry",
    "ShadowEntry",
    "ShellResult",
    "ensure_file",
]

#: What :meth:`Host.run` returns; re-exported so that callers never import subprocess.
CommandResult = subprocess.CompletedProcess

#: Environment of every command run by :meth:`Host.run`.
COMMAND_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: How much of a failing command's stderr goes into the error message.
STDERR_TAIL = 400
_SETSID_CANDIDATES = ("/usr/bin/setsid", "/bin/setsid")


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str


@dataclass(frozen=True, slots=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ShadowEntry:
    """The two shadow fields the node manager manages: the password field and the expiry day
    (``""`` when the account never expires)."""

    name: str
    password: str
    expire: str


def _passwd(entry: pwd.struct_passwd) -> PasswdEntry:
    return PasswdEntry(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_gecos, entry.pw_dir, entry.pw_shell)


def _group(entry: grp.struct_group) -> GroupEntry:
    return GroupEntry(entry.gr_name, entry.gr_gid, tuple(entry.gr_mem))


def _shadow(line: str) -> ShadowEntry | None:
    """One line of the shadow file (``name:password:...:expire:...``), None when it is not one."""
    fields = line.split(":")
    return ShadowEntry(fields[0], fields[1], fields[7]) if len(fields) >= 8 else None


class Host(LinkSafeFiles, ConfinedFiles):
    """The real machine. Subclass or replace methods in tests; see ``FakeHost``. The file
    methods (``atomic_write``, ``read_file``, ``remove_tree``...) come from ``LinkSafeFiles``."""

    shadow_path = Path("/etc/shadow")

    # --- commands -------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 60,
        check: bool = True,
        stdout: Path | None = None,
    ) -> CommandResult[bytes]:
        """Run ``argv`` (a list, never a shell string) and capture its output.

        With ``check`` a non-zero exit raises ``BackendError``; without it the caller inspects
        ``returncode``. A missing program or a timeout always raises. ``stdout``: a new file
        (created 0600, never an existing one) that receives the standard output instead of
        memory, so a size limit on the command's files (``prlimit --fsize``) caps it too."""
        args = [str(a) for a in argv]
        try:
            if stdout is None:
                result = forkguard.run(args, input=input, capture_output=True, timeout=timeout, env=COMMAND_ENV)
            else:
                with open(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as out:
                    result = forkguard.run(
                        args, input=input, stdout=out, stderr=subprocess.PIPE, timeout=timeout, env=COMMAND_ENV,
                    )
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"{args[0]} timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise BackendError(f"cannot run {args[0]}: {_describe(exc)}") from exc
        if check and result.returncode != 0:
            tail = result.stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise BackendError(f"{args[0]} exited with status {result.returncode}: {tail or '(no stderr)'}")
        return result

    def run_shell(self, command: str, *, timeout: float, output_limit: int = 64 * 1024) -> ShellResult:
        """Run an authority-supplied shell command line (``conf_files``) as root with
        ``/bin/sh -c``: the one shell string the node runs; see :mod:`nodemanager.hostshell`.
        A failure or timeout is a result; only a shell that cannot start raises."""
        return run_shell_command(command, timeout=timeout, output_limit=output_limit)

    def run_as(
        self,
        argv: Sequence[str],
        *,
        uid: int,
        gid: int,
        groups: Sequence[int] = (),
        timeout: float = 60,
        check: bool = True,
    ) -> CommandResult[bytes]:
        """Run ``argv`` like :meth:`run`, but as ``uid:gid`` with exactly ``groups`` as its
        supplementary groups, in ``/``.

        For work inside trees a sliver can write (copying its home into its disk image): a
        program running with the sliver's own rights can only reach what the sliver could reach
        anyway, whatever links it planted or swaps in meanwhile. Root (uid 0) is refused: use
        :meth:`run`."""
        if uid == 0:
            raise BackendError(f"run_as refuses uid 0 for {argv[0] if argv else '?'}")
        args = [str(a) for a in argv]
        try:
            result = forkguard.run(
                args, capture_output=True, timeout=timeout, env=COMMAND_ENV, cwd="/",
                user=uid, group=gid, extra_groups=list(groups), stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"{args[0]} (as uid {uid}) timed out after {timeout:g}s") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"cannot run {args[0]} as uid {uid}: {exc}") from exc
        if check and result.returncode != 0:
            tail = result.stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise BackendError(f"{args[0]} (as uid {uid}) exited with status {result.returncode}: "
                               f"{tail or '(no stderr)'}")
        return result

    # --- account databases ----------------------------------------------------------------
    def getpwnam(self, name: str) -> PasswdEntry | None:
        try:
            return _passwd(pwd.getpwnam(name))
        except KeyError:
            return None

    def getpwuid(self, uid: int) -> PasswdEntry | None:
        try:
            return _passwd(pwd.getpwuid(uid))
        except KeyError:
            return None

    def all_users(self) -> list[PasswdEntry]:
        """Every account, in one pass over the password database."""
        return [_passwd(entry) for entry in pwd.getpwall()]

    def getgrnam(self, name: str) -> GroupEntry | None:
        try:
            entry = grp.getgrnam(name)
        except KeyError:
            return None
        return _group(entry)

    def getgrgid(self, gid: int) -> GroupEntry | None:
        try:
            return _group(grp.getgrgid(gid))
        except KeyError:
            return None

    def all_groups(self) -> list[GroupEntry]:
        """Every group with its listed members, in one pass over the group database."""
        return [_group(entry) for entry in grp.getgrall()]

    def shadow_entry(self, name: str) -> ShadowEntry | None:
        """The shadow line of ``name`` (needs root), or None when there is none. Stops at that
        line: each operation on a sliver asks this, on a machine with one line per sliver."""
        prefix = f"{name}:"
        for line in self._shadow_lines():
            if line.startswith(prefix) and (entry := _shadow(line)) is not None:
                return entry
        return None

    def shadow_entries(self) -> dict[str, ShadowEntry]:
        """Every shadow line by account name, from one read of the shadow file (needs root)."""
        entries: dict[str, ShadowEntry] = {}
        for line in self._shadow_lines():
            entry = _shadow(line)
            if entry is not None and entry.name not in entries:
                entries[entry.name] = entry
        return entries

    def _shadow_lines(self) -> list[str]:
        try:
            text = self.shadow_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise BackendError(f"cannot read {self.shadow_path}: {_describe(exc)}") from exc
        return text.splitlines()

    # --- processes ------------------------------------------------------------------------
    def pids_of_uid(self, uid: int) -> list[int]:
        """Live (non-zombie) processes whose real or effective uid is ``uid``, from ``/proc``."""
        wanted = str(uid)
        return sorted(pid for pid, ids in _live_processes() if wanted in ids)

    def pids_by_uid(self, uids: Collection[int]) -> dict[int, list[int]]:
        """Like :meth:`pids_of_uid` for several uids in ONE pass over ``/proc``: uid -> sorted
        pids (every uid of ``uids`` is a key). A process whose real and effective uids are two
        of ``uids`` is listed under its real uid."""
        wanted = {str(uid): uid for uid in uids}
        found: dict[int, list[int]] = {uid: [] for uid in uids}
        for pid, ids in _live_processes():
            owner = next((wanted[i] for i in ids if i in wanted), None)
            if owner is not None:
                found[owner].append(pid)
        for pids in found.values():
            pids.sort()
        return found

    def kill(self, pid: int, sig: int, *, uid: int | None = None) -> None:
        """Send ``sig`` to ``pid`` through a pidfd; a process that is already gone is success.
        With ``uid``, only if the process is still one of ``uid`` (see :meth:`signal_pids`)."""
        if pid <= 1:
            raise BackendError(f"refusing to signal pid {pid}")
        self.signal_pids([pid], sig, uid=uid)

    def signal_pids(self, pids: Iterable[int], sig: int, *, uid: int | None = None,
                    check: Callable[[int], bool] | None = None) -> int:
        """Send ``sig`` to each of ``pids`` that is still the process the caller means; returns
        how many were signalled.

        Each process is opened as a pidfd first and signalled through it, so a pid that was
        reused since the caller read it is never hit: with ``uid``, only a live, non-zombie
        process whose real or effective uid is ``uid`` is signalled; with ``check`` (called
        with the pid once it is open, e.g. to read its cgroup), only one it accepts. pid 0/1
        and this process are never signalled. Gone processes are skipped silently."""
        own, sent = os.getpid(), 0
        wanted = None if uid is None else str(uid)

        def accept(pid: int) -> bool:
            if wanted is not None:
                found = process_ids(pid)
                if found is None or found[0] in ("Z", "X") or wanted not in found[1]:
                    return False
            return check is None or check(pid)

        for pid in pids:
            if pid > 1 and pid != own:
                sent += signal_through_pidfd(pid, sig, accept if (uid is not None or check) else None)
        return sent

    def open_proc_events(self) -> ProcEventChannel:
        """A netlink channel to the kernel's process events (see :mod:`nodemanager.hostprocs`).
        Raises ``BackendError`` saying why when this process may not listen (no CAP_NET_ADMIN,
        not the initial network namespace, no connector in the kernel)."""
        return ProcEventChannel.open()


    def spawn_detached(
        self,
        argv: Sequence[str],
        *,
        uid: int,
        gid: int,
        home: Path,
        env: Mapping[str, str],
        log_path: Path,
        cgroups: Sequence[Path] = (),
        groups: Sequence[int] | None = None,
    ) -> None:
        """Start ``argv`` as ``uid:gid`` with exactly ``groups`` as supplementary groups (None:
        ``gid`` alone) in a new session, in ``home``, stdin from /dev/null, stdout and stderr
        appended to ``log_path``. The groups are the caller's decision, never what
        ``/etc/group`` happens to list for the name (a stale entry must grant nothing).

        With ``cgroups`` (cgroup directories), the child joins each of them (writes ``0`` to its
        ``cgroup.procs``) while still root, before dropping privileges and before exec, so
        nothing it forks can escape the sliver's limits. A cgroup that refuses the process
        fails the start (the child exits before exec; reported as setsid's failure).

        Returns once the program is forked, not when it ends. Failure to exec the program itself
        is reported by ``setsid`` into the log (it happens after the fork)."""
        setsid = next((p for p in _SETSID_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("setsid")
        if setsid is None:
            raise BackendError("cannot start programs detached: util-linux setsid is not installed")
        groups = [gid] if groups is None else list(groups)
        try:
            log_fd = self._open_log(Path(log_path), uid, gid)
        except OSError as exc:
            raise BackendError(f"cannot open log {log_path}: {_describe(exc)}") from exc
        # Popen drops privileges BEFORE preexec_fn runs, and a process that is no longer root
        # cannot join a root-owned cgroup: with cgroups, join first, then drop privileges there.
        join = _join_then_drop(list(cgroups), uid, gid, groups) if cgroups else None
        try:
            child = forkguard.popen(
                [setsid, "--fork", "--", *[str(a) for a in argv]],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=str(home),
                env=dict(env),
                umask=0o022,
                start_new_session=True,
                user=None if join else uid,
                group=None if join else gid,
                extra_groups=None if join else groups,
                preexec_fn=join,  # noqa: PLW1509 - only raw system calls run in the child (see _join_then_drop)
            )
            try:
                returncode = child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"cannot start {argv[0]}: {exc}") from exc
        finally:
            os.close(log_fd)
        if returncode != 0:
            raise BackendError(f"cannot start {argv[0]}: setsid exited with status {returncode}")

    # --- time -----------------------------------------------------------------------------
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic()


def ensure_file(host: Host, path: Path, data: bytes, *, uid: int, gid: int, mode: int) -> bool:
    """Make ``path`` a regular file holding exactly ``data``, owned by ``uid:gid`` with ``mode``,
    through ``host``: written (``atomic_write``) only when it is not so already, so an unchanged
    file keeps its inode and mtime. True when written. Idempotent."""
    info = host.stat_file(path)
    if (info is not None and info.kind == "file" and (info.uid, info.gid, info.mode) == (uid, gid, mode)
            and info.size == len(data) and host.read_file(path) == data):
        return False
    host.atomic_write(path, data, uid=uid, gid=gid, mode=mode)
    return True


def _join_then_drop(cgroups: list[Path], uid: int, gid: int, groups: list[int]) -> Callable[[], None]:
    """The ``preexec_fn`` of a start into cgroups: runs in the forked child, as root.

    Uses only plain system calls (no locks, no logging): the daemon has threads, and the child
    of a fork must not touch a lock another thread may have held."""
    procs = [os.fsencode(os.path.join(str(path), "cgroup.procs")) for path in cgroups]

    def join() -> None:
        for name in procs:
            fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        os.setgroups(groups)
        os.setregid(gid, gid)
        os.setreuid(uid, uid)

    return join


def _live_processes() -> Iterator[tuple[int, list[str]]]:
    """``(pid, [real uid, effective uid])`` of every live process but this one, from one pass
    over ``/proc``. Zombies are skipped (they cannot be killed and would keep a stop loop
    spinning), and so are processes that exit during the scan."""
    own = os.getpid()
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) == own:
                continue
            found = process_ids(int(entry.name))
            if found is not None and found[0] not in ("Z", "X"):
                yield int(entry.name), found[1]
