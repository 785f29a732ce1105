"""What a removed account leaves outside its home, and removing it before its uid can return.

A sliver's uid comes back only to the same slice (:mod:`.uids`), but a uid still owning files in
``/tmp``, a SysV shared-memory segment or a crontab would hand them to whatever runs as that uid
next, and they would outlive the slice for ever. Destroy therefore removes, after the sliver's
processes are gone and before ``userdel``:

* **files in shared directories**: every entry owned by the uid in the world-writable directories
  of local filesystems. Which ones: ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``, every
  POSIX message-queue mount (``mqueue``, e.g. ``/dev/mqueue``), and any other world-writable
  directory that is a mount point or sits directly in ``/``, ``/var``, ``/run`` or ``/dev`` --
  found from the mount table and four short listings, so the search stays cheap. Directories on
  network filesystems are skipped (their files are not this node's to judge). The walk
  (:meth:`~nodemanager.host.Host.remove_owned`) never follows a link and never crosses into
  another filesystem or mount; a deeper tree than it descends, or a directory of the uid still
  holding others' files, is left and logged.
* **SysV IPC**: shared-memory segments, message queues and semaphore sets whose owner or creator
  is the uid (``/proc/sysvipc/*``, removed with ``ipcrm``).
* **cron and at jobs**: the spool files owned by the uid under the cron and at spool directories
  of Debian, Red Hat and SUSE (crontabs and at jobs are files owned by their user; removing the
  file removes the job).

Everything goes through the :class:`~nodemanager.host.Host` seam and is idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.errors import BackendError
from ..host import Host

logger = logging.getLogger(__name__)

SHARED_DIRECTORIES = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/run/lock"))
#: Directories whose world-writable subdirectories are also searched (one listing each).
SCANNED_PARENTS = (Path("/"), Path("/var"), Path("/run"), Path("/dev"))
SPOOL_DIRECTORIES = (Path("/var/spool/cron"), Path("/var/spool/at"), Path("/var/spool/atjobs"),
                     Path("/var/spool/atspool"))
REMOTE_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "afs", "9p", "fuse.sshfs",
    "gfs2", "ocfs2", "beegfs", "fuse.glusterfs", "fuse.ceph",
})
SYSVIPC = Path("/proc/sysvipc")
#: /proc/sysvipc file -> (its id column, ipcrm option).
_IPC_KINDS = {"shm": ("shmid", "-m"), "msg": ("msqid", "-q"), "sem": ("semid", "-s")}


@dataclass(frozen=True, slots=True)
class LeftoverReport:
    """What one clean-up removed (``files``, ``ipc`` objects) and what it had to leave."""

    files: int = 0
    ipc: int = 0
    left: int = 0


def shared_directories(host: Host) -> list[Path]:
    """The world-writable directories of local filesystems to clean (see the module docstring),
    each once, in a stable order."""
    mounts = host.mounts()
    candidates: list[Path] = list(SHARED_DIRECTORIES)
    candidates += [Path(point) for point, fstype in mounts if fstype == "mqueue"]
    candidates += [Path(point) for point, _ in mounts]
    for parent in SCANNED_PARENTS:
        candidates += [parent / name for name in host.list_dirs(parent)]
    chosen: list[Path] = []
    for path in dict.fromkeys(candidates):
        info = host.stat_file(path)
        if info is None or info.kind != "dir" or not info.mode & 0o002:
            continue
        fstype = _filesystem_of(path, mounts)
        if fstype in REMOTE_FILESYSTEMS or fstype.startswith("fuse."):
            logger.info("event=leftovers-skipped directory=%s fstype=%s reason=not-local", path, fstype)
            continue
        chosen.append(path)
    return chosen


def _filesystem_of(path: Path, mounts: list[tuple[str, str]]) -> str:
    """The type of the filesystem ``path`` is on: the last mount whose point contains it."""
    best, fstype = -1, ""
    for point, kind in mounts:
        mount = PurePosixPath(point)
        if (mount == path or mount in path.parents) and len(mount.parts) >= best:
            best, fstype = len(mount.parts), kind
    return fstype


def remove_leftovers(host: Host, name: str, uid: int) -> LeftoverReport:
    """Remove what uid ``uid`` (sliver ``name``) owns outside its home. Call when none of its
    processes is left and before the account is removed. Failures of single objects are logged
    and counted in ``left``; a failure to run at all raises ``BackendError``. Idempotent."""
    if uid < 1000:
        raise BackendError(f"sliver {name}: refusing to clean up after uid {uid} (a system account)")
    files = left = 0
    for directory in [*shared_directories(host), *SPOOL_DIRECTORIES]:
        removed, kept = host.remove_owned(directory, uid)
        files, left = files + removed, left + kept
        if kept:
            logger.warning("sliver=%s event=leftovers-kept directory=%s uid=%d count=%d", name, directory, uid, kept)
    ipc, ipc_left = _remove_ipc(host, name, uid)
    report = LeftoverReport(files, ipc, left + ipc_left)
    if files or ipc:
        logger.info("sliver=%s event=leftovers-removed uid=%d files=%d ipc=%d left=%d",
                    name, uid, files, ipc, report.left)
    return report


def ipc_objects(host: Host, uid: int) -> list[tuple[str, int]]:
    """``(ipcrm option, id)`` of every SysV IPC object owned or created by ``uid``."""
    found: list[tuple[str, int]] = []
    for kind, (id_column, option) in _IPC_KINDS.items():
        raw = host.read_file(SYSVIPC / kind, limit=64 << 20)
        lines = (raw or b"").decode("ascii", "replace").splitlines()
        if not lines:
            continue
        header = lines[0].split()
        try:
            columns = [header.index(id_column), header.index("uid"), header.index("cuid")]
        except ValueError:
            continue
        for line in lines[1:]:
            fields = line.split()
            if len(fields) < len(header):
                continue
            ident, owner, creator = (fields[i] for i in columns)
            if ident.isdigit() and str(uid) in (owner, creator):
                found.append((option, int(ident)))
    return found


def _remove_ipc(host: Host, name: str, uid: int) -> tuple[int, int]:
    removed = left = 0
    for option, ident in ipc_objects(host, uid):
        result = host.run(["ipcrm", option, str(ident)], check=False)
        if result.returncode == 0:
            removed += 1
        elif ident in {i for o, i in ipc_objects(host, uid) if o == option}:
            left += 1
            logger.warning("sliver=%s event=ipc-kept uid=%d kind=%s id=%d error=%r", name, uid, option, ident,
                           result.stderr.decode("utf-8", "replace").strip()[-200:])
    return removed, left
