"""Removing a uid's files from shared trees, and the mount table: the walk behind
:meth:`~nodemanager.hostfiles.LinkSafeFiles.remove_owned`.

Apart from :mod:`nodemanager.hostfiles` because it is one self-contained procedure: a post-order
walk over directory descriptors that never follows a link and never leaves the filesystem (or the
mount) it started on, so root can clean ``/tmp`` of a removed account's files while other users
keep writing there.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

#: How deep :func:`remove_owned_below` descends (one open descriptor per level).
REMOVE_OWNED_DEPTH = 128
MOUNTS_FILE = Path("/proc/self/mounts")


def mount_entries(text: str) -> list[tuple[str, str, str]]:
    """``(mount point, filesystem type, options)`` of each line of a ``/proc/self/mounts`` text,
    in order, with the octal escapes of spaces, tabs, newlines and backslashes undone in the
    mount point (options "" when a line has none). The one parser of the mount table."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 2:
            entries.append((_unescape_mount(fields[1]), fields[2], fields[3] if len(fields) > 3 else ""))
    return entries


def parse_mounts(raw: bytes) -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` of each line of ``/proc/self/mounts`` (:func:`mount_entries`)."""
    return [(point, fstype) for point, fstype, _ in mount_entries(raw.decode("utf-8", "replace"))]


def _unescape_mount(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def remove_owned_below(top: int, top_path: str, uid: int, device: int, mounts: frozenset[str]) -> tuple[int, int]:
    """Post-order removal of ``uid``'s entries below the open directory ``top``, iterative so
    that a deep tree cannot exhaust the stack. A frame is ``(fd, path, owner, names left)``."""
    removed = left = 0
    frames: list[tuple[int, str, int, list[str]]] = [(top, top_path, -1, sorted(os.listdir(top)))]
    try:
        while frames:
            fd, path, owner, names = frames[-1]
            if not names:  # every entry seen: leave this directory, removing it when it is uid's
                frames.pop()
                if not frames:
                    break
                os.close(fd)
                if owner == uid:
                    done, kept = _removed(os.rmdir, os.path.basename(path), frames[-1][0])
                    removed, left = removed + done, left + kept
                continue
            name = names.pop()
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            mine = info.st_uid == uid
            if not stat.S_ISDIR(info.st_mode):
                if mine:
                    done, kept = _removed(os.unlink, name, fd)
                    removed, left = removed + done, left + kept
                continue
            child_path = os.path.join(path, name)
            if info.st_dev != device or child_path in mounts or len(frames) > REMOVE_OWNED_DEPTH:
                left += mine
                continue
            try:
                child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                left += mine
                continue
            try:
                opened = os.fstat(child)
                if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                    raise FileNotFoundError(name)  # swapped for something else meanwhile
                children = sorted(os.listdir(child))
            except OSError:
                os.close(child)
                left += mine
                continue
            frames.append((child, child_path, info.st_uid, children))
    finally:
        for fd, *_ in frames[1:]:
            os.close(fd)
    return removed, left


def _removed(remove: Callable[..., None], name: str, dir_fd: int) -> tuple[int, int]:
    """``remove(name, dir_fd=dir_fd)``: ``(1, 0)`` when it went, ``(0, 0)`` when it was already
    gone, ``(0, 1)`` when it is still there (it is counted as left, not raised)."""
    try:
        remove(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0, 0
    except OSError:
        return 0, 1
    return 1, 0
