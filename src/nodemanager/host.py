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
  position is replaced, never written through.
* Processes are signalled by pid after a ``/proc`` scan; zombies are skipped (they cannot be
  killed and would keep a stop loop spinning), and pid 0/1 are never signalled.
* Detached programs are started through util-linux ``setsid --fork`` after privileges are dropped,
  so the daemon never becomes their parent: it has nothing to reap and restarting it leaves
  sliver processes alone.

All methods may be called from any thread.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .core.errors import BackendError

#: What :meth:`Host.run` returns; re-exported so that callers never import subprocess.
CommandResult = subprocess.CompletedProcess

#: Environment of every command run by :meth:`Host.run`.
COMMAND_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: How much of a failing command's stderr goes into the error message.
STDERR_TAIL = 400
#: Reads of sliver-controlled files stop here: a sliver must not make the daemon read gigabytes.
READ_LIMIT = 1 << 20
_MAX_SYMLINK_HOPS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
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


@dataclass(frozen=True, slots=True)
class FileInfo:
    """``lstat`` of a path: never describes the target of a symbolic link."""

    uid: int
    gid: int
    mode: int  # permission bits only
    kind: str  # "file", "dir", "symlink" or "other"
    size: int


def _passwd(entry: pwd.struct_passwd) -> PasswdEntry:
    return PasswdEntry(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_gecos, entry.pw_dir, entry.pw_shell)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


class Host:
    """The real machine. Subclass or replace methods in tests; see ``FakeHost``."""

    shadow_path = Path("/etc/shadow")

    # --- commands -------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 60,
        check: bool = True,
    ) -> CommandResult[bytes]:
        """Run ``argv`` (a list, never a shell string) and capture its output.

        With ``check`` a non-zero exit raises ``BackendError``; without it the caller inspects
        ``returncode``. A missing program or a timeout always raises."""
        args = [str(a) for a in argv]
        try:
            result = subprocess.run(
                args, input=input, capture_output=True, timeout=timeout, env=COMMAND_ENV, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"{args[0]} timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise BackendError(f"cannot run {args[0]}: {_describe(exc)}") from exc
        if check and result.returncode != 0:
            tail = result.stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise BackendError(f"{args[0]} exited with status {result.returncode}: {tail or '(no stderr)'}")
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
        return GroupEntry(entry.gr_name, entry.gr_gid, tuple(entry.gr_mem))

    def shadow_entry(self, name: str) -> ShadowEntry | None:
        """The shadow line of ``name`` (needs root), or None when there is none."""
        try:
            text = self.shadow_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise BackendError(f"cannot read {self.shadow_path}: {_describe(exc)}") from exc
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) >= 8 and fields[0] == name:
                return ShadowEntry(name, fields[1], fields[7])
        return None

    # --- files, safe against links planted by a sliver ------------------------------------
    def _open_dir(self, path: Path, create: tuple[int, int, int] | None = None) -> int:
        """Open directory ``path`` component by component without following untrusted links.

        With ``create=(uid, gid, mode)`` missing components are made with that owner and mode.
        Returns a directory file descriptor the caller must close."""
        if not path.is_absolute():
            raise BackendError(f"{path}: not an absolute path")
        parts = list(path.parts[1:])
        current = "/"
        fd = os.open("/", _DIR_FLAGS)
        hops = 0
        try:
            while parts:
                part = parts.pop(0)
                if part in ("", "."):
                    continue
                if part == "..":
                    raise BackendError(f"{path}: '..' is not allowed")
                try:
                    child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if create is None:
                        raise
                    uid, gid, mode = create
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                    except FileExistsError:
                        parts.insert(0, part)  # raced with someone else: look again
                        continue
                    child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                    try:
                        os.fchown(child, uid, gid)
                        os.fchmod(child, mode)
                    except OSError:
                        os.close(child)
                        raise
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    info = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISLNK(info.st_mode):
                        raise BackendError(f"{os.path.join(current, part)}: not a directory") from exc
                    holder = os.fstat(fd)
                    if holder.st_uid != 0 or holder.st_mode & 0o022:
                        raise BackendError(
                            f"refusing to follow symbolic link {os.path.join(current, part)} "
                            "in a directory others can write"
                        ) from exc
                    hops += 1
                    if hops > _MAX_SYMLINK_HOPS:
                        raise BackendError(f"{path}: too many symbolic links") from exc
                    target = os.path.normpath(os.path.join(current, os.readlink(part, dir_fd=fd)))
                    parts = list(Path(target).parts[1:]) + parts
                    os.close(fd)
                    fd = os.open("/", _DIR_FLAGS)
                    current = "/"
                    continue
                os.close(fd)
                fd = child
                current = os.path.join(current, part)
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextmanager
    def _parent_of(self, path: Path, action: str) -> Iterator[int | None]:
        """A descriptor of ``path``'s directory (None when it does not exist), opened safely.
        Any ``OSError`` in the block becomes ``BackendError("cannot ACTION PATH: ...")``."""
        try:
            try:
                dfd = self._open_dir(path.parent)
            except FileNotFoundError:
                yield None
                return
            try:
                yield dfd
            finally:
                os.close(dfd)
        except OSError as exc:
            raise BackendError(f"cannot {action} {path}: {_describe(exc)}") from exc

    def makedirs_owned(self, path: Path, uid: int, gid: int, mode: int) -> None:
        """Make directory ``path`` (and missing parents) owned by ``uid:gid`` with ``mode``.

        An existing ``path`` gets its owner and mode corrected; existing parents are left alone.
        Idempotent."""
        path = Path(path)
        try:
            fd = self._open_dir(path, create=(uid, gid, mode))
            try:
                info = os.fstat(fd)
                if (info.st_uid, info.st_gid) != (uid, gid):
                    os.fchown(fd, uid, gid)
                if stat.S_IMODE(info.st_mode) != mode:
                    os.fchmod(fd, mode)
            finally:
                os.close(fd)
        except OSError as exc:
            raise BackendError(f"cannot make directory {path}: {_describe(exc)}") from exc

    def atomic_write(self, path: Path, data: bytes, *, uid: int, gid: int, mode: int) -> None:
        """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename) owned by
        ``uid:gid`` with ``mode``. A link at ``path`` is replaced, never followed."""
        path = Path(path)
        temp = f".{path.name}.nm-{secrets.token_hex(6)}"
        with self._parent_of(path, "write") as dfd:
            if dfd is None:
                raise FileNotFoundError(errno.ENOENT, "no such directory")
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(temp, flags, 0o600, dir_fd=dfd)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                with suppress(OSError):
                    os.unlink(temp, dir_fd=dfd)
                raise
            os.fsync(dfd)

    def stat_file(self, path: Path) -> FileInfo | None:
        """``lstat`` of ``path`` through a safe walk; None when it does not exist."""
        path = Path(path)
        with self._parent_of(path, "inspect") as dfd:
            if dfd is None:
                return None
            try:
                info = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return None
        return FileInfo(info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), _kind(info.st_mode), info.st_size)

    def read_file(self, path: Path, *, limit: int = READ_LIMIT) -> bytes | None:
        """Content of the regular file ``path`` (at most ``limit`` bytes); None when it is missing
        or not a regular file (a link, a FIFO...). Never blocks on a FIFO, never follows a link."""
        path = Path(path)
        with self._parent_of(path, "read") as dfd:
            if dfd is None:
                return None
            try:
                fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                    return None
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                chunks: list[bytes] = []
                remaining = limit
                while remaining > 0:
                    chunk = os.read(fd, min(remaining, 65536))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    remaining -= len(chunk)
                return b"".join(chunks)
            finally:
                os.close(fd)

    def remove_file(self, path: Path) -> None:
        """Unlink ``path`` (a file or a link, not a directory). Missing is success."""
        path = Path(path)
        with self._parent_of(path, "remove") as dfd:
            if dfd is not None:
                with suppress(FileNotFoundError):
                    os.unlink(path.name, dir_fd=dfd)

    def remove_tree(self, path: Path) -> None:
        """Remove ``path`` and everything below it without following links. Missing is success."""
        path = Path(path)
        with self._parent_of(path, "remove") as dfd:
            if dfd is None:
                return
            try:
                info = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path.name, dir_fd=dfd)
            else:
                os.unlink(path.name, dir_fd=dfd)

    def write_text(self, path: Path, text: str) -> None:
        """Write ``text`` to the existing file ``path`` in place: no temporary file, no creation,
        no truncation. For kernel interface files (cgroupfs, /proc, /sys) where a write is a
        command and the file cannot be replaced. The kernel's refusal (EINVAL, EBUSY...) becomes
        a ``BackendError``."""
        path = Path(path)
        with self._parent_of(path, "write") as dfd:
            if dfd is None:
                raise FileNotFoundError(errno.ENOENT, "no such directory")
            fd = os.open(path.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)

    def remove_dir(self, path: Path) -> None:
        """``rmdir`` of ``path`` (an empty directory, or a cgroup whose files the kernel owns).
        Missing is success; a non-empty or busy directory raises ``BackendError``."""
        path = Path(path)
        with self._parent_of(path, "remove directory") as dfd:
            if dfd is not None:
                with suppress(FileNotFoundError):
                    os.rmdir(path.name, dir_fd=dfd)

    def list_dirs(self, directory: Path) -> list[str]:
        """Names of the subdirectories of ``directory`` (links are not followed), sorted; a
        missing directory has none."""
        directory = Path(directory)
        try:
            dfd = self._open_dir(directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {_describe(exc)}") from exc
        try:
            with os.scandir(dfd) as entries:
                return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {_describe(exc)}") from exc
        finally:
            os.close(dfd)

    def list_executables(self, directory: Path) -> list[str]:
        """Names of the regular files in ``directory`` with an execute bit, sorted; links and
        subdirectories are ignored. A missing directory has none."""
        directory = Path(directory)
        try:
            dfd = self._open_dir(directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {_describe(exc)}") from exc
        try:
            with os.scandir(dfd) as entries:
                return sorted(
                    entry.name for entry in entries
                    if stat.S_ISREG((mode := entry.stat(follow_symlinks=False).st_mode)) and mode & 0o111
                )
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {_describe(exc)}") from exc
        finally:
            os.close(dfd)

    # --- processes ------------------------------------------------------------------------
    def pids_of_uid(self, uid: int) -> list[int]:
        """Live (non-zombie) processes whose real or effective uid is ``uid``, from ``/proc``."""
        found = []
        own = os.getpid()
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit() or int(entry.name) == own:
                    continue
                try:
                    with open(f"/proc/{entry.name}/status", "rb") as status:
                        text = status.read().decode("ascii", "replace")
                except OSError:
                    continue  # exited meanwhile
                uids: list[str] = []
                state = ""
                for line in text.splitlines():
                    if line.startswith("State:"):
                        state = line.split()[1] if len(line.split()) > 1 else ""
                    elif line.startswith("Uid:"):
                        uids = line.split()[1:3]
                if state not in ("Z", "X") and str(uid) in uids:
                    found.append(int(entry.name))
        return sorted(found)

    def pids_by_uid(self, uids: Collection[int]) -> dict[int, list[int]]:
        """Like :meth:`pids_of_uid` for several uids in ONE pass over ``/proc``: uid -> sorted
        pids (every uid of ``uids`` is a key). A process whose real and effective uids are two
        of ``uids`` is listed under its real uid."""
        wanted = {str(uid): uid for uid in uids}
        found: dict[int, list[int]] = {uid: [] for uid in uids}
        own = os.getpid()
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit() or int(entry.name) == own:
                    continue
                try:
                    with open(f"/proc/{entry.name}/status", "rb") as status:
                        text = status.read().decode("ascii", "replace")
                except OSError:
                    continue
                state, ids = "", []
                for line in text.splitlines():
                    if line.startswith("State:"):
                        state = line.split()[1] if len(line.split()) > 1 else ""
                    elif line.startswith("Uid:"):
                        ids = line.split()[1:3]
                        break
                if state in ("Z", "X"):
                    continue
                owner = next((wanted[i] for i in ids if i in wanted), None)
                if owner is not None:
                    found[owner].append(int(entry.name))
        for pids in found.values():
            pids.sort()
        return found

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig`` to ``pid``; a process that is already gone is success."""
        if pid <= 1:
            raise BackendError(f"refusing to signal pid {pid}")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except OSError as exc:
            raise BackendError(f"cannot signal pid {pid}: {_describe(exc)}") from exc

    def _open_log(self, path: Path, uid: int, gid: int) -> int:
        """Open ``path`` for appending: a new file made for ``uid:gid``, or an existing regular
        file of ``uid`` with one link. Anything else found there (a link, a FIFO, a hard link, a
        file of someone else) is removed and replaced."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        dfd = self._open_dir(path.parent)
        try:
            for _ in range(3):
                try:
                    fd = os.open(path.name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
                except FileExistsError:
                    pass
                else:
                    try:
                        os.fchown(fd, uid, gid)
                    except OSError:
                        os.close(fd)
                        raise
                    return fd
                try:
                    fd = os.open(path.name, flags, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                        raise
                else:
                    info = os.fstat(fd)
                    if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == uid:
                        return fd
                    os.close(fd)
                self.remove_tree(path)
            raise BackendError(f"cannot open log {path}: it keeps being replaced")
        finally:
            os.close(dfd)

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
    ) -> None:
        """Start ``argv`` as ``uid:gid`` (with that user's supplementary groups) in a new session,
        in ``home``, stdin from /dev/null, stdout and stderr appended to ``log_path``.

        With ``cgroups`` (cgroup directories), the child joins each of them (writes ``0`` to its
        ``cgroup.procs``) while still root, before dropping privileges and before exec, so
        nothing it forks can escape the sliver's limits. A cgroup that refuses the process
        fails the start (the child exits before exec; reported as setsid's failure).

        Returns once the program is forked, not when it ends. Failure to exec the program itself
        is reported by ``setsid`` into the log (it happens after the fork)."""
        setsid = next((p for p in _SETSID_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("setsid")
        if setsid is None:
            raise BackendError("cannot start programs detached: util-linux setsid is not installed")
        entry = self.getpwuid(uid)
        groups = os.getgrouplist(entry.name, gid) if entry is not None else [gid]
        try:
            log_fd = self._open_log(Path(log_path), uid, gid)
        except OSError as exc:
            raise BackendError(f"cannot open log {log_path}: {_describe(exc)}") from exc
        # Popen drops privileges BEFORE preexec_fn runs, and a process that is no longer root
        # cannot join a root-owned cgroup: with cgroups, join first, then drop privileges there.
        join = _join_then_drop(list(cgroups), uid, gid, groups) if cgroups else None
        try:
            child = subprocess.Popen(
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
