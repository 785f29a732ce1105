"""Link-safe file operations: the file half of the :class:`~nodemanager.host.Host` seam.

A sliver owns its home, so it may plant symbolic links there (``~/.ssh/authorized_keys ->
/etc/passwd``). Every operation here walks the path one component at a time with ``O_NOFOLLOW``
and works on directory file descriptors. A symbolic link is followed only when the directory
holding it is owned by root and writable by nobody else (so only root could have put it there,
e.g. ``/home -> /srv/home``); any other link is refused, and a link in the final position is
replaced, never written through.

:class:`LinkSafeFiles` is a mixin that ``Host`` inherits: ``Host`` stays THE seam that tests
replace (``FakeHost`` overrides every public method, inherited ones included), this module only
keeps the file code apart from commands, account databases and processes. Every failure becomes a
:class:`~nodemanager.core.errors.BackendError`. All methods may be called from any thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from .core.errors import BackendError
from .forkguard import FORK_GUARD
from .hostsweep import MOUNTS_FILE, parse_mounts, remove_owned_below

#: Reads of sliver-controlled files stop here: a sliver must not make the daemon read gigabytes.
READ_LIMIT = 1 << 20
_MAX_SYMLINK_HOPS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class FileInfo:
    """``lstat`` of a path: never describes the target of a symbolic link."""

    uid: int
    gid: int
    mode: int  # permission bits (with setuid, setgid and sticky)
    kind: str  # "file", "dir", "symlink" or "other"
    size: int
    inode: int = 0
    mtime_ns: int = 0

    @property
    def stamp(self) -> tuple[int, int, int]:
        """``(inode, size, mtime_ns)``: changes whenever the file is replaced or rewritten."""
        return (self.inode, self.size, self.mtime_ns)


def describe_oserror(exc: OSError) -> str:
    """The human part of an ``OSError`` for a ``BackendError`` message."""
    return exc.strerror or str(exc)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _file_info(info: os.stat_result) -> FileInfo:
    return FileInfo(info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), _kind(info.st_mode), info.st_size,
                    info.st_ino, info.st_mtime_ns)


def _is_executable_file(entry: os.DirEntry[str]) -> bool:
    mode = entry.stat(follow_symlinks=False).st_mode
    return stat.S_ISREG(mode) and bool(mode & 0o111)


def replace_in_directory(dfd: int, name: str, data: bytes, *, uid: int, gid: int, mode: int) -> None:
    """Replace the entry ``name`` of the open directory ``dfd`` with a file holding ``data``,
    owned by ``uid:gid`` with ``mode``: a temporary file (``O_EXCL``, ``O_NOFOLLOW``) written,
    fsynced and renamed over ``name``, then the directory fsynced. A link at ``name`` is replaced,
    never followed. While an executable file is open for writing, no fork of this process may
    run (``forkguard``): a child holding its descriptor would make it "Text file busy"."""
    temp = f".{name[:200]}.nm-{secrets.token_hex(6)}"
    try:
        with FORK_GUARD.writing_executable() if mode & 0o111 else nullcontext():
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError:
        with suppress(OSError):
            os.unlink(temp, dir_fd=dfd)
        raise
    os.fsync(dfd)


class LinkSafeFiles:
    """File operations that never write through, read through or remove through a link a
    sliver may have planted. Mixed into :class:`~nodemanager.host.Host`."""

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
            raise BackendError(f"cannot {action} {path}: {describe_oserror(exc)}") from exc

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
            raise BackendError(f"cannot make directory {path}: {describe_oserror(exc)}") from exc

    def atomic_write(self, path: Path, data: bytes, *, uid: int, gid: int, mode: int) -> None:
        """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename) owned by
        ``uid:gid`` with ``mode``. A link at ``path`` is replaced, never followed."""
        path = Path(path)
        with self._parent_of(path, "write") as dfd:
            if dfd is None:
                raise FileNotFoundError(errno.ENOENT, "no such directory")
            replace_in_directory(dfd, path.name, data, uid=uid, gid=gid, mode=mode)

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
        return _file_info(info)

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
        return self._scan_names(directory, lambda entry: entry.is_dir(follow_symlinks=False))

    def list_executables(self, directory: Path) -> list[str]:
        """Names of the regular files in ``directory`` with an execute bit, sorted; links and
        subdirectories are ignored. A missing directory has none."""
        return self._scan_names(directory, _is_executable_file)

    def file_stamps(self, directory: Path) -> dict[str, tuple[int, int, int]]:
        """``name -> (inode, size, mtime_ns)`` of every regular file in ``directory``, from one
        listing (links are not followed); a missing directory has none. Cheap change detection
        for many files at once (the authoritative keys files)."""
        directory = Path(directory)
        try:
            dfd = self._open_dir(directory)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {describe_oserror(exc)}") from exc
        try:
            stamps: dict[str, tuple[int, int, int]] = {}
            with os.scandir(dfd) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(info.st_mode):
                        stamps[entry.name] = (info.st_ino, info.st_size, info.st_mtime_ns)
            return stamps
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {describe_oserror(exc)}") from exc
        finally:
            os.close(dfd)

    def mounts(self) -> list[tuple[str, str]]:
        """``(mount point, filesystem type)`` of every mount of this namespace, in mount order."""
        return parse_mounts(self.read_file(MOUNTS_FILE, limit=16 << 20) or b"")

    def remove_owned(self, directory: Path, uid: int) -> tuple[int, int]:
        """Remove every entry below ``directory`` owned by ``uid``; returns ``(removed, left)``.

        For the leftovers of a removed account in shared (world-writable) directories. The walk
        uses directory descriptors and never follows a link, never crosses into another
        filesystem or another mount point (bind mounts of the same filesystem included), and
        stops ``hostsweep.REMOVE_OWNED_DEPTH`` levels down (each level holds one descriptor). Directories
        of others are searched; a directory of ``uid`` still holding entries of others after
        its own are gone is left (counted in ``left``), as is anything the kernel refuses to
        remove. A missing ``directory`` is success. Idempotent."""
        directory = Path(directory)
        mounts = frozenset(point for point, _ in self.mounts())
        try:
            top = self._open_dir(directory)
        except FileNotFoundError:
            return (0, 0)
        except OSError as exc:
            raise BackendError(f"cannot open {directory}: {describe_oserror(exc)}") from exc
        try:
            return remove_owned_below(top, str(directory), uid, os.fstat(top).st_dev, mounts)
        except OSError as exc:
            raise BackendError(f"cannot clean {directory}: {describe_oserror(exc)}") from exc
        finally:
            os.close(top)

    def _scan_names(self, directory: Path, keep: Callable[[os.DirEntry[str]], bool]) -> list[str]:
        """Sorted names of the entries of ``directory`` that ``keep`` accepts, listed through a
        safe walk; a missing directory has none. ``keep`` may raise ``OSError``."""
        directory = Path(directory)
        try:
            dfd = self._open_dir(directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {describe_oserror(exc)}") from exc
        try:
            with os.scandir(dfd) as entries:
                return sorted(entry.name for entry in entries if keep(entry))
        except OSError as exc:
            raise BackendError(f"cannot list {directory}: {describe_oserror(exc)}") from exc
        finally:
            os.close(dfd)

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
