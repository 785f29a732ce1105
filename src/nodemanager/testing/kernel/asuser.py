"""What runs as the sliver in its home (``Host.run_as``), with the sliver's rights: ``cp -a --
HOME/. DEST/`` copies what the uid can read (owned by the uid afterwards, modes kept, as a
non-root ``cp -a`` leaves them; what it cannot read is reported) and ``find HOME -mindepth 1
-delete`` removes what the uid may unlink (write and search on the directory, the sticky bit
honoured, directories only once empty, mount points never)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..fakehost import FakeFile, below
from .net import OK, Answer, Unmodelled

if TYPE_CHECKING:
    from .host import KernelHost

DirAttrs = tuple[int, int, int]


def may(caller: tuple[int, int], attrs: DirAttrs, bits: int) -> bool:
    """Whether ``caller`` (uid, gid) has ``bits`` (r=4, w=2, x=1) on something of ``attrs``."""
    uid, gid = caller
    owner, group, mode = attrs
    if uid == 0:
        return True
    granted = (mode >> 6) if owner == uid else (mode >> 3) if group == gid else mode
    return granted & bits == bits


def _reachable(host: KernelHost, caller: tuple[int, int], top: Path, path: Path) -> bool:
    """Every directory from ``top`` down to ``path``'s parent can be listed and entered."""
    current = path.parent
    while True:
        attrs = host.dirs.get(current)
        if attrs is not None and not may(caller, attrs, 0o5):
            return False
        if current == top or current == current.parent:
            return True
        current = current.parent


def copy_as(host: KernelHost, caller: tuple[int, int], source: str, dest: str) -> Answer:
    """``cp -a -- SOURCE/. DEST/`` as ``caller``."""
    if not source.endswith("/.") or not dest.endswith("/"):
        raise Unmodelled(f"cp -a -- {source} {dest}")
    top, into = Path(source[:-2]), Path(dest.rstrip("/"))
    if into not in host.dirs or not may(caller, host.dirs[into], 0o3):
        return 1, b"", f"cp: cannot create regular file '{into}': Permission denied"
    uid, gid = caller
    errors = []
    for path in sorted(d for d in host.dirs if below(d, top)):
        if _reachable(host, caller, top, path) and may(caller, host.dirs[path], 0o5):
            host.dirs[into / path.relative_to(top)] = (uid, gid, host.dirs[path][2])
    for path, f in sorted((p, f) for p, f in host.files.items() if below(p, top)):
        if _reachable(host, caller, top, path) and may(caller, (f.uid, f.gid, f.mode), 0o4):
            host.files[into / path.relative_to(top)] = FakeFile(f.data, uid, gid, f.mode, host._stamp())
        else:
            errors.append(f"cp: cannot open '{path}' for reading: Permission denied")
    return (1, b"", "\n".join(errors)) if errors else OK


def delete_as(host: KernelHost, caller: tuple[int, int], top: Path, points: set[Path],
              forget: Callable[[Path], None]) -> Answer:
    """``find TOP -mindepth 1 -delete`` as ``caller``; ``forget`` drops a removed file's volume."""
    entries = sorted({p for p in [*host.files, *host.dirs] if below(p, top)},
                     key=lambda p: (-len(p.parts), str(p)))
    errors = []
    for path in entries:
        parent = host.dirs.get(path.parent, (0, 0, 0o755))
        owner = host.files[path].uid if path in host.files else host.dirs[path][0]
        sticky_ok = not parent[2] & 0o1000 or caller[0] in (owner, parent[0])
        empty = not any(p.parent == path for p in [*host.files, *host.dirs])
        if path in points or not (may(caller, parent, 0o3) and sticky_ok and empty):
            errors.append(f"find: cannot delete '{path}': Permission denied")
            continue
        host.files.pop(path, None)
        host.dirs.pop(path, None)
        forget(path)
    return (1, b"", "\n".join(errors)) if errors else OK
