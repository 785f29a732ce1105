"""Files confined below a directory: the part of the :class:`~nodemanager.host.Host` seam that
installs the authority's configuration files (``conf_files``).

:mod:`nodemanager.hostfiles` follows a symbolic link that only root could have planted (e.g.
``/home -> /srv/home``). Below an allowed directory of ``conf_files.allowed_dirs`` that is not
enough: the destination comes from the authority, and no component below the allowed directory
may be a link at all, whoever made it. So the allowed directory itself is opened with the usual
safe walk, and every component below it with ``O_NOFOLLOW`` through directory descriptors; a link
there refuses the operation. A link in the final position is replaced (rename), never written
through. Every failure becomes a :class:`~nodemanager.core.errors.BackendError`.

:class:`ConfinedFiles` is a mixin that ``Host`` inherits (``FakeHost`` overrides its methods).
All methods may be called from any thread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from .core.errors import BackendError
from .hostfiles import FileInfo, _file_info, describe_oserror, replace_in_directory

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


class ConfinementRefused(BackendError):
    """A component below the allowed directory is a symbolic link or not a directory."""


class ConfinedFiles:
    """``inspect_below`` and ``write_below``: see the module docstring."""

    def _open_dir(self, path: Path, create: tuple[int, int, int] | None = None) -> int:  # from LinkSafeFiles
        raise NotImplementedError

    def _walk_below(self, root: Path, parts: Sequence[str], *, create_mode: int | None) -> int | None:
        """A descriptor of ``root/parts[0]/.../parts[-2]`` (the file's directory), each component
        below ``root`` opened with ``O_NOFOLLOW``; None when one is missing and ``create_mode``
        is None (else it is made, owned by this process's user, with that mode)."""
        if not parts or any(p in ("", ".", "..") or "/" in p for p in parts):
            raise BackendError(f"{root}: bad path components {list(parts)!r}")
        try:
            fd = self._open_dir(root)
        except FileNotFoundError:
            raise BackendError(f"allowed directory {root} does not exist") from None
        shown = str(root)
        try:
            for part in parts[:-1]:
                shown = os.path.join(shown, part)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if create_mode is None:
                        os.close(fd)
                        return None
                    with suppress(FileExistsError):
                        os.mkdir(part, create_mode, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        kind = "a symbolic link" if _is_link(part, fd) else "not a directory"
                        raise ConfinementRefused(f"{shown} is {kind}: refused below {root}") from exc
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def inspect_below(self, root: Path, parts: Sequence[str], *, limit: int) -> tuple[FileInfo, bytes | None] | None:
        """``lstat`` of ``root/parts...`` and, when it is a regular file of at most ``limit``
        bytes, its content; None when it (or a directory on the way) does not exist. Never
        follows a link below ``root``, never blocks on a FIFO."""
        try:
            dfd = self._walk_below(Path(root), parts, create_mode=None)
            if dfd is None:
                return None
            try:
                try:
                    info = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    return None
                if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                    return _file_info(info), None
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    info = os.fstat(fd)
                    data = _read_at_most(fd, limit + 1) if stat.S_ISREG(info.st_mode) else None
                finally:
                    os.close(fd)
                return _file_info(info), (data if data is not None and len(data) <= limit else None)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise BackendError(f"cannot inspect {Path(root).joinpath(*parts)}: {describe_oserror(exc)}") from exc

    def write_below(self, root: Path, parts: Sequence[str], data: bytes, *, uid: int, gid: int, mode: int,
                    dir_mode: int = 0o755) -> None:
        """Replace ``root/parts...`` with ``data`` atomically (temporary file, fsync, rename)
        owned by ``uid:gid`` with ``mode``; missing directories below ``root`` are made with
        ``dir_mode`` (``root`` itself must exist). A link below ``root`` refuses the write; a
        link at the destination is replaced, never followed."""
        path = Path(root).joinpath(*parts)
        try:
            dfd = self._walk_below(Path(root), parts, create_mode=dir_mode)
            assert dfd is not None
            try:
                replace_in_directory(dfd, parts[-1], data, uid=uid, gid=gid, mode=mode)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise BackendError(f"cannot write {path}: {describe_oserror(exc)}") from exc


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
