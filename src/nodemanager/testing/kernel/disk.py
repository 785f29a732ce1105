"""Disk images as the kernel and util-linux present them: sparse files holding an ext4
filesystem, loop devices, and mounts that hide what their target held.

* A **volume** is what an image file holds: its size (sparse, so a size costs nothing), the size
  of the ext4 filesystem ``mkfs.ext4`` made in it (0: none) and that filesystem's files and
  directories. ``truncate`` sizes the file, ``mkfs.ext4`` formats it (root directory owned as
  ``-E root_owner`` says, ``lost+found`` root's), ``mv -f -T`` renames it with its volume.
* A **loop device** (``/dev/loopN``, the lowest free N) shows a volume with the capacity the file
  had when attached or at the last ``losetup -c``; ``resize2fs DEVICE`` grows the filesystem to
  that capacity (online), ``resize2fs FILE`` to the file's size (offline, after ``e2fsck -f``,
  which also makes ``lost+found`` again when it is missing).
  A loop device made by ``mount -o loop`` is auto-cleared: it goes when its last mount goes and
  no process still holds a lazily unmounted filesystem; ``losetup -d`` of a device in use only
  marks it so, of one not in use detaches it. ``losetup -J -l`` lists devices with their backing file's current path
  (`` (deleted)`` once unlinked or replaced).
* A **mount** swaps namespaces: while a volume is mounted on a directory, what the directory held
  is hidden and the volume's content is what every file operation there sees; on ``umount`` what
  was written there goes back into the volume and the hidden content reappears. A mount is busy
  while a live process has its working directory under it or another mount sits under it:
  ``umount`` refuses, ``umount -l`` detaches it at once and leaves the loop device to the
  processes. ``findmnt`` answers from the mount table.
* As the sliver (``run_as``): ``cp -a`` and ``find -delete`` with the uid's rights (:mod:`.asuser`).

One volume is mounted in one place at a time (mounting it a second time raises
:class:`~.net.Unmodelled`), and image files live outside mounted filesystems.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..fakehost import FakeFile, below, children_of
from .asuser import copy_as, delete_as
from .net import OK, Answer, Unmodelled

if TYPE_CHECKING:
    from .host import KernelHost

KIB = 1024
MIB = 1 << 20
#: mkfs.ext4 refuses anything smaller.
MIN_FS = 64 * KIB
DirAttrs = tuple[int, int, int]


@dataclass
class Volume:
    size: int
    fs_size: int = 0
    files: dict[Path, FakeFile] = field(default_factory=dict)
    dirs: dict[Path, DirAttrs] = field(default_factory=dict)
    #: e2fsck -f ran since the last mount (resize2fs FILE needs it).
    checked: bool = False

    def used(self) -> int:
        """Bytes the sparse file occupies: the filesystem's own overhead plus its content."""
        if not self.fs_size:
            return 0
        content = sum(len(f.data) for f in self.files.values()) + 4096 * (len(self.files) + len(self.dirs))
        return min(self.size, self.fs_size // 50 + MIB + content)


@dataclass
class Loop:
    name: str
    volume: Volume
    back_file: Path
    capacity: int
    #: Processes still using a lazily unmounted filesystem of this device.
    holders: set[int] = field(default_factory=set)
    #: Made by ``mount -o loop``: detached with its last use. (``losetup -f FILE`` makes one
    #: that stays until ``losetup -d``: :meth:`Storage.attach`.)
    autoclear: bool = True


@dataclass
class Mount:
    target: Path
    loop: Loop
    options: str
    hidden_files: dict[Path, FakeFile]
    hidden_dirs: dict[Path, DirAttrs]
    hidden_root: DirAttrs


class Storage:
    """The volumes, loop devices and loop mounts of one :class:`~.host.KernelHost`."""

    def __init__(self, host: KernelHost, *, free_bytes: int = 100 << 30) -> None:
        self.host = host
        self.volumes: dict[Path, Volume] = {}
        self.loops: dict[str, Loop] = {}
        self.mounts: list[Mount] = []
        self.free_bytes = free_bytes
        #: False: online resizing is refused (a container without CAP_SYS_RESOURCE).
        self.online_resize = True

    # --- what other parts ask -------------------------------------------------------------------
    def volume(self, path: Path) -> Volume | None:
        path = Path(path)
        if path not in self.host.files:
            self.volumes.pop(path, None)
            return None
        return self.volumes.get(path)

    def forget(self, path: Path) -> None:
        """The file at ``path`` was replaced or removed: its volume is no longer there."""
        self.volumes.pop(Path(path), None)

    def mount_points(self) -> set[Path]:
        return {m.target for m in self.mounts}

    def entries(self) -> list[tuple[str, str, str, str]]:
        return [(m.loop.name, str(m.target), "ext4", f"rw,{m.options.removeprefix('loop,')},relatime")
                for m in self.mounts]

    def back_file(self, loop: Loop) -> str:
        """The path holding the device's volume now, as the kernel reports it."""
        found = next((p for p, v in self.volumes.items() if v is loop.volume and p in self.host.files), None)
        return str(found) if found is not None else f"{loop.back_file} (deleted)"

    def busy(self, target: Path) -> set[int]:
        """Live processes whose working directory is at or under ``target``."""
        return {pid for pid, cwd in self.host.cwd.items()
                if pid in self.host.processes and (cwd == target or below(cwd, target))}

    def gc(self) -> None:
        """Auto-clear: a device with no mount and no live holder is detached."""
        mounted = {m.loop.name for m in self.mounts}
        for name, loop in list(self.loops.items()):
            loop.holders &= set(self.host.processes)
            if loop.autoclear and name not in mounted and not loop.holders:
                del self.loops[name]

    def attach(self, image: Path) -> str:
        """What ``losetup -f --show IMAGE`` does (not a command of the node's: an administrator's,
        or an older version's): a loop device that stays until detached. Returns its name."""
        volume = self.volume(image)
        assert volume is not None, image
        name = self._free_loop()
        self.loops[name] = Loop(name, volume, image, volume.size, autoclear=False)
        return name

    def _free_loop(self) -> str:
        return next(f"/dev/loop{n}" for n in range(len(self.loops) + 1) if f"/dev/loop{n}" not in self.loops)

    # --- commands --------------------------------------------------------------------------------
    def run(self, args: list[str], caller: tuple[int, int] | None) -> Answer:
        self.gc()
        program, rest = args[0], args[1:]
        handler = {"truncate": self._truncate, "mkfs.ext4": self._mkfs, "mv": self._mv, "chown": self._chown,
                   "chmod": self._chmod, "losetup": self._losetup, "mount": self._mount, "umount": self._umount,
                   "findmnt": self._findmnt, "resize2fs": self._resize2fs, "e2fsck": self._e2fsck,
                   "stat": self._stat}.get(program)
        if program == "find":
            return self._find(rest, caller)
        if program == "cp" and caller is not None and rest[:2] == ["-a", "--"] and len(rest) == 4:
            return copy_as(self.host, caller, rest[2], rest[3])
        if handler is None or (caller is not None and program not in ("find", "cp")):
            raise Unmodelled(" ".join(args))
        answer = handler(rest)
        self.gc()
        return answer

    def _truncate(self, rest: list[str]) -> Answer:
        if len(rest) != 3 or rest[0] != "-s" or not rest[1].rstrip("K").isdigit():
            raise Unmodelled("truncate " + " ".join(rest))
        path = Path(rest[2])
        size = int(rest[1].rstrip("K")) * (KIB if rest[1].endswith("K") else 1)
        if path not in self.host.files:
            if path in self.host.dirs:
                return 1, b"", f"truncate: cannot open '{path}' for writing: Is a directory"
            self.host.files[path] = FakeFile(b"", 0, 0, 0o644, self.host._stamp())
        volume = self.volume(path) or self.volumes.setdefault(path, Volume(len(self.host.files[path].data)))
        volume.size = size
        return OK

    def _mkfs(self, rest: list[str]) -> Answer:
        if rest == ["-V"]:
            return 0, b"mke2fs 1.47.0 (5-Feb-2023)\n", ""
        path = Path(rest[-1])
        owner = next((o.split("=", 1)[1] for o in rest if o.startswith("root_owner=")), "0:0")
        uid, gid = (int(x) for x in owner.split(":"))
        volume = self.volume(path)
        if path not in self.host.files:
            return 1, b"", f"The file {path} does not exist and no size was specified."
        if volume is None or volume.size < MIN_FS:
            return 1, b"", f"mkfs.ext4: Filesystem larger than apparent device size / too small: {path}"
        if any(m.loop.volume is volume for m in self.mounts):
            return 1, b"", f"{path} is mounted; will not make a filesystem here!"
        volume.fs_size, volume.files, volume.checked = volume.size, {}, True
        volume.dirs = {Path("."): (uid, gid, 0o755), Path("lost+found"): (0, 0, 0o700)}
        return OK

    def _mv(self, rest: list[str]) -> Answer:
        if rest[:2] != ["-f", "-T"] or len(rest) != 4:
            raise Unmodelled("mv " + " ".join(rest))
        source, target = Path(rest[2]), Path(rest[3])
        if source not in self.host.files:
            return 1, b"", f"mv: cannot stat '{source}': No such file or directory"
        if target in self.host.dirs:
            return 1, b"", f"mv: cannot overwrite directory '{target}' with non-directory"
        volume = self.volume(source)
        self.forget(target)
        self.host.files[target] = self.host.files.pop(source)
        self.forget(source)
        if volume is not None:
            self.volumes[target] = volume
        return OK

    def _chown(self, rest: list[str]) -> Answer:
        uid, _, gid = rest[0].partition(":")
        return self._set_attrs(rest, lambda attrs: (int(uid), int(gid or attrs[1]), attrs[2]))

    def _chmod(self, rest: list[str]) -> Answer:
        return self._set_attrs(rest, lambda attrs: (attrs[0], attrs[1], int(rest[0], 8)))

    def _set_attrs(self, rest: list[str], change) -> Answer:  # type: ignore[no-untyped-def]
        if len(rest) != 2:
            raise Unmodelled(" ".join(rest))
        path = Path(rest[1])
        if path in self.host.files:
            f = self.host.files[path]
            uid, gid, mode = change((f.uid, f.gid, f.mode))
            self.host.files[path] = FakeFile(f.data, uid, gid, mode, f.stamp)
        elif path in self.host.dirs:
            self.host.dirs[path] = change(self.host.dirs[path])
        else:
            return 1, b"", f"cannot access '{path}': No such file or directory"
        return OK

    def _losetup(self, rest: list[str]) -> Answer:
        if rest == ["-V"]:
            return 0, b"losetup from util-linux 2.38.1\n", ""
        if rest == ["-J", "-l", "-O", "NAME,BACK-FILE"]:
            if not self.loops:
                return OK
            devices = [{"name": n, "back-file": self.back_file(loop)} for n, loop in sorted(self.loops.items())]
            return 0, json.dumps({"loopdevices": devices}, indent=3).encode() + b"\n", ""
        if len(rest) == 2 and rest[0] in ("-d", "-c"):
            loop = self.loops.get(rest[1])
            if loop is None:
                verb = "detach" if rest[0] == "-d" else "set capacity"
                return 1, b"", f"losetup: {rest[1]}: {verb} failed: No such device or address"
            if rest[0] == "-c":
                loop.capacity = loop.volume.size
            elif not any(m.loop is loop for m in self.mounts) and not loop.holders:
                del self.loops[rest[1]]
            else:
                loop.autoclear = True  # a device in use is only marked: it goes with its last use
            return OK
        raise Unmodelled("losetup " + " ".join(rest))

    def _mount(self, rest: list[str]) -> Answer:
        if len(rest) != 4 or rest[0] != "-o" or "loop" not in rest[1].split(","):
            raise Unmodelled("mount " + " ".join(rest))
        image, target = Path(rest[2]), Path(rest[3])
        if image not in self.host.files:
            return 32, b"", f"mount: {target}: special device {image} does not exist."
        if target not in self.host.dirs:
            return 32, b"", f"mount: {target}: mount point does not exist."
        volume = self.volume(image)
        if volume is None or not volume.fs_size:
            return 32, b"", (f"mount: {target}: wrong fs type, bad option, bad superblock on "
                             f"/dev/loop{len(self.loops)}, missing codepage or helper program, or other error.")
        if any(m.loop.volume is volume for m in self.mounts):
            raise Unmodelled(f"mount {image} on {target}: it is already mounted (one mount per volume is modelled)")
        loop = next((lp for lp in self.loops.values() if lp.volume is volume), None)
        if loop is None:
            loop = Loop(self._free_loop(), volume, image, volume.size)
            self.loops[loop.name] = loop
        files, dirs = self.host.files, self.host.dirs
        hidden_files = {p: f for p, f in files.items() if below(p, target)}
        hidden_dirs = {p: d for p, d in dirs.items() if below(p, target)}
        for p in hidden_files:
            del files[p]
        for p in hidden_dirs:
            del dirs[p]
        mount = Mount(target, loop, rest[1], hidden_files, hidden_dirs, dirs[target])
        dirs[target] = volume.dirs.get(Path("."), (0, 0, 0o755))
        files.update({target / rel: f for rel, f in volume.files.items()})
        dirs.update({target / rel: d for rel, d in volume.dirs.items() if rel != Path(".")})
        volume.files, volume.dirs, volume.checked = {}, {}, False
        self.mounts.append(mount)
        return OK

    def _umount(self, rest: list[str]) -> Answer:
        lazy = rest[:1] == ["-l"]
        if len(rest) != 1 + lazy:
            raise Unmodelled("umount " + " ".join(rest))
        target = Path(rest[-1])
        mount = next((m for m in reversed(self.mounts) if m.target == target), None)
        if mount is None:
            return 32, b"", f"umount: {target}: not mounted."
        inner = [m for m in self.mounts if below(m.target, target)]
        busy = self.busy(target)
        if (busy or inner) and not lazy:
            return 32, b"", f"umount: {target}: target is busy."
        for submount in sorted(inner, key=lambda m: len(m.target.parts), reverse=True):
            submount.loop.holders |= self.busy(submount.target)
            self._detach(submount)
        mount.loop.holders |= busy
        self._detach(mount)
        return OK

    def _detach(self, mount: Mount) -> None:
        files, dirs, target = self.host.files, self.host.dirs, mount.target
        volume = mount.loop.volume
        volume.files = {p.relative_to(target): f for p, f in files.items() if below(p, target)}
        volume.dirs = {p.relative_to(target): d for p, d in dirs.items() if below(p, target)}
        volume.dirs[Path(".")] = dirs.get(target, (0, 0, 0o755))
        for p in [p for p in files if below(p, target)]:
            del files[p]
        for p in [p for p in dirs if below(p, target)]:
            del dirs[p]
        dirs[target] = mount.hidden_root
        files.update(mount.hidden_files)
        dirs.update(mount.hidden_dirs)
        self.mounts.remove(mount)

    def _findmnt(self, rest: list[str]) -> Answer:
        if rest == ["-V"]:
            return 0, b"findmnt from util-linux 2.38.1\n", ""
        entries = self.host.mount_entries()
        if rest[:2] == ["-n", "-o"] and len(rest) == 5 and rest[3] == "-T":
            path = Path(rest[4])
            found = max((e for e in entries if Path(e[1]) == path or below(path, Path(e[1]))),
                        key=lambda e: len(Path(e[1]).parts))
            columns = {"FSTYPE": found[2], "OPTIONS": found[3], "TARGET": found[1], "SOURCE": found[0]}
            return 0, (" ".join(columns[c] for c in rest[2].split(",")) + "\n").encode(), ""
        if rest[:4] == ["-n", "-l", "-o", "TARGET"] and rest[4:5] == ["-S"] and len(rest) == 6:
            targets = [point for source, point, _, _ in entries if source == rest[5]]
            return (0, "".join(f"{t}\n" for t in targets).encode(), "") if targets else (1, b"", "")
        raise Unmodelled("findmnt " + " ".join(rest))

    def _resize2fs(self, rest: list[str]) -> Answer:
        if len(rest) != 1:
            raise Unmodelled("resize2fs " + " ".join(rest))
        loop = self.loops.get(rest[0])
        volume = loop.volume if loop is not None else self.volume(Path(rest[0]))
        if volume is None or not volume.fs_size:
            return 1, b"", f"resize2fs: Bad magic number in super-block while trying to open {rest[0]}"
        mounted = any(m.loop.volume is volume for m in self.mounts)
        if loop is None:
            if mounted:
                raise Unmodelled(f"resize2fs {rest[0]}: offline resize of a mounted filesystem")
            if not volume.checked:
                return 1, b"", f"Please run 'e2fsck -f {rest[0]}' first."
            volume.fs_size = volume.size
            return OK
        if mounted and not self.online_resize:
            return 1, b"", "resize2fs: Permission denied to resize filesystem"
        if mounted and loop.capacity < volume.fs_size:
            return 1, b"", "resize2fs: On-line shrinking not supported"
        volume.fs_size = loop.capacity
        return OK

    def _e2fsck(self, rest: list[str]) -> Answer:
        volume = self.volume(Path(rest[-1]))
        if volume is None or not volume.fs_size:
            return 8, b"", f"e2fsck: Bad magic number in super-block while trying to open {rest[-1]}"
        if any(m.loop.volume is volume for m in self.mounts):
            return 8, b"", f"{rest[-1]} is mounted.\ne2fsck: Cannot continue, aborting."
        volume.checked = "-f" in rest or volume.checked
        volume.dirs.setdefault(Path("lost+found"), (0, 0, 0o700))  # e2fsck makes it again when missing
        return OK

    def _stat(self, rest: list[str]) -> Answer:
        if rest[:3] != ["-f", "-c", "%a %S"] or len(rest) != 4:
            raise Unmodelled("stat " + " ".join(rest))
        return 0, f"{self.free_bytes // 4096} 4096\n".encode(), ""

    # --- find --------------------------------------------------------------------------------------
    def _find(self, rest: list[str], caller: tuple[int, int] | None) -> Answer:
        top = Path(rest[0]) if rest else Path(".")
        options = rest[1:]
        if top not in self.host.dirs:
            return 1, b"", f"find: '{top}': No such file or directory"
        children = sorted([*children_of(self.host.files, top), *children_of(self.host.dirs, top)])
        if options == ["-mindepth", "1", "-maxdepth", "1", "-print", "-quit"]:
            return 0, (f"{children[0]}\n" if children else "").encode(), ""
        if len(options) == 6 and options[:3] == ["-maxdepth", "1", "-name"] and options[4] == "-printf":
            lines = [self._printf(options[5], p) for p in children if fnmatch.fnmatchcase(p.name, options[3])]
            return 0, "".join(lines).encode(), ""
        if options == ["-mindepth", "1", "-delete"] and caller is not None:
            return delete_as(self.host, caller, top, self.mount_points(), self.forget)
        raise Unmodelled("find " + " ".join(rest))

    def _printf(self, fmt: str, path: Path) -> str:
        volume = self.volume(path)
        data = self.host.files.get(path)
        size = volume.size if volume is not None else len(data.data) if data is not None else 4096
        used = volume.used() if volume is not None else size
        fields = {"%f": path.name, "%s": str(size), "%b": str(-(-used // 512)), "\\n": "\n"}
        out = fmt
        for key, value in fields.items():
            out = out.replace(key, value)
        return out
