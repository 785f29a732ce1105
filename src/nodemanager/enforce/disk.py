"""Disk enforcement: ``nm_disk_quota`` (KiB, 0 = unlimited) on each sliver's home.

Two mechanisms, chosen per ``home_root`` filesystem (``mechanism()``), both tamper-proof against
the sliver itself:

* ``quota``: the filesystem under ``home_root`` is ext4 or xfs mounted with user quotas that are
  on -> ``setquota -u UID 0 HARD 0 0 MOUNT`` (hard block limit in KiB).
* ``image``: anywhere else (this project's test machines: ext4 without QFMT_V2 support, btrfs),
  one sparse ext4 image per sliver, ``<images_dir>/<name>.img`` (root-owned, mode 0600),
  loop-mounted ``nosuid,nodev`` on the home; the filesystem's size is the limit. A larger quota
  grows it (:mod:`.imagegrow`, crash-safe: online, else offline); a smaller one is NOT applied
  while mounted (shrinking needs an unmount under the sliver's feet) and shows as a difference in
  ``status --resources``.
  btrfs qgroups are not used: a nested subvolume escapes them (dependencies.md). Images are
  sparse, so their sizes may add up to more than the images filesystem has free: ``apply``
  reports that overcommit as a note.

Root never works inside a tree the sliver can write. A home that already holds files when its
image is first mounted (a quota given to an existing sliver, a home written while its image was
not mounted) is carried over by ``cp -a`` running **as the sliver's uid**, into the image mounted
at a staging point ``<home_root>/.nodemanager-staging-<name>`` (root's directory: no sliver can
redirect the mount), and the old content is then deleted as the sliver's uid too. Whatever links
the sliver planted or swaps in meanwhile, that copy reaches only what the sliver could read
anyway, and copies links as links. What the sliver cannot read itself is not carried over.

Cooperation with the account path (the account backend's hooks, ``enforcing.EnforcementHooks``;
the order matters):

* create: ``useradd`` -> home directory -> :meth:`DiskEnforcer.prepare_home` (mounts the image,
  carrying over anything already in the home, as above) -> ``.nodemanager`` files.
* destroy: kill the sliver's processes (cgroups) -> :meth:`DiskEnforcer.release_home` (unmount,
  delete the image) -> ``userdel --remove``.
* start-up: ``apply`` with every sliver's home re-mounts images (after a reboot) and grows them.

``apply`` never deletes an image or a quota of a sliver absent from its RSpecs: data goes only
through ``release_home``/``remove``, and through :meth:`DiskEnforcer.sweep`, which removes the
images and staging mounts of accounts that no longer exist for the node manager.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Collection, Mapping
from pathlib import Path

from ..core.errors import BackendError
from ..host import Host
from .base import RSpecs
from .imagegrow import GROW_SUFFIX, IMAGE_MODE, grow_cut_short, grow_image, grow_marker

log = logging.getLogger(__name__)

QUOTA_FILESYSTEMS = ("ext4", "xfs")
QUOTA_OPTIONS = ("usrquota", "usrjquota", "uquota", "quota")
STAGING_PREFIX = ".nodemanager-staging-"
IMAGE_SUFFIX = ".img"


class DiskEnforcer:
    name = "disk"

    def __init__(self, host: Host, home_root: Path, images_dir: Path, *, mechanism: str = "auto") -> None:
        self.host = host
        self.home_root = Path(home_root)
        self.images_dir = Path(images_dir)
        self._mechanism = None if mechanism == "auto" else mechanism
        self._quota_mount: str | None = None  # the quota filesystem's mount point
        self._names: dict[int, str] = {}  # uid -> sliver, from the last apply (quota observed)
        self._copying: set[str] = set()  # homes being carried over into their image right now
        self._copying_lock = threading.Lock()

    # --- choosing the mechanism -----------------------------------------------------------
    def mechanism(self) -> str:
        """``quota`` or ``image`` for ``home_root``'s filesystem (detected once)."""
        if self._mechanism is None:
            self._mechanism = "image"
            out = self.host.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS,TARGET", "-T", str(self.home_root)],
                                check=False)
            fields = (out.stdout or b"").decode().split()
            if len(fields) >= 3 and fields[0] in QUOTA_FILESYSTEMS:
                options = {o.split("=")[0] for o in fields[1].split(",")}
                if options & set(QUOTA_OPTIONS) and self._quota_on(fields[2]):
                    self._mechanism, self._quota_mount = "quota", fields[2]
        return self._mechanism

    def _quota_on(self, mount: str) -> bool:
        result = self.host.run(["quotaon", "-p", "-u", mount], check=False)
        return b"is on" in (result.stdout or b"")

    def _mount_point(self) -> str:
        if self._quota_mount is None:
            out = self.host.run(["findmnt", "-n", "-o", "TARGET", "-T", str(self.home_root)]).stdout
            self._quota_mount = (out or b"").decode().strip()
        return self._quota_mount

    def available(self) -> str | None:
        try:
            mechanism = self.mechanism()
            tools = ["setquota"] if mechanism == "quota" else ["mkfs.ext4", "losetup", "findmnt"]
            for program in tools:
                self.host.run([program, "-V"])
            if mechanism == "image":
                self.host.makedirs_owned(self.images_dir, 0, 0, 0o700)
        except BackendError as exc:
            return f"disk quotas unavailable: {exc}"
        return None

    # --- images ---------------------------------------------------------------------------
    def image_of(self, name: str) -> Path:
        return self.images_dir / f"{name}.img"

    def _loops(self) -> dict[str, str]:
        """back file -> loop device, for every attached loop device."""
        out = self.host.run(["losetup", "-J", "-l", "-O", "NAME,BACK-FILE"]).stdout
        try:
            devices = json.loads(out or b"{}").get("loopdevices", []) if out and out.strip() else []
        except ValueError as exc:
            raise BackendError("cannot parse `losetup -J`") from exc
        return {str(d.get("back-file", "")).removesuffix(" (deleted)"): d["name"] for d in devices if d.get("name")}

    def _targets(self, device: str) -> list[str]:
        result = self.host.run(["findmnt", "-n", "-l", "-o", "TARGET", "-S", device], check=False)
        return [line for line in (result.stdout or b"").decode().splitlines() if line.strip()]

    def staging_of(self, name: str) -> Path:
        return self.home_root / f"{STAGING_PREFIX}{name}"

    def prepare_home(self, name: str, uid: int, gid: int, home: Path, quota_kib: int) -> tuple[str, ...]:
        """Make ``home`` (mode 0700, ``uid:gid``) carry a limit of ``quota_kib``. Idempotent.

        image: creates the image when missing (and the quota is not 0), mounts it on the home
        when not mounted (carrying over what the home held), grows it when the quota grew.
        quota: sets the user's hard block limit. Returns notes (e.g. a refused shrink)."""
        home = Path(home)
        if self.host.stat_file(home) is None:
            self.host.makedirs_owned(home, uid, gid, 0o700)
        if self.mechanism() == "quota":
            self.host.run(["setquota", "-u", str(uid), "0", str(max(0, quota_kib)), "0", "0", self._mount_point()])
            return ()
        image = self.image_of(name)
        info = self.host.stat_file(image)
        notes: list[str] = []
        unfinished = False
        if info is None:
            if quota_kib <= 0:
                return ()
            self._create_image(image, uid, gid, quota_kib)
            size = quota_kib
        else:
            size = info.size // 1024
            before = grow_cut_short(self.host, image)
            if before is not None:  # the file may have grown, the filesystem not: finish the grow
                size, quota_kib, unfinished = before, max(quota_kib, size), True
            if (info.uid, info.mode) != (0, IMAGE_MODE):  # made by an older version (0644)
                self.host.run(["chown", "0:0", str(image)])
                self.host.run(["chmod", f"{IMAGE_MODE:o}", str(image)])
        device = self._loops().get(str(image))
        mounted = device is not None and str(home) in self._targets(device)
        if not mounted:
            notes += self._mount(name, image, home, uid, gid)
            device = self._loops().get(str(image))
        if (quota_kib > size or unfinished) and device is not None:
            notes += grow_image(self.host, name, image, device, home, size, quota_kib)
        elif 0 < quota_kib < size or quota_kib == 0:
            notes.append(f"sliver {name}: disk image stays at {size} KiB (quota {quota_kib} KiB): "
                         "images are not shrunk or dropped while in use")
        if device is not None:  # after any mount: a first one, an offline grow's, one cut short by a crash
            self._drop_lost_found(home)
        self.host.makedirs_owned(home, uid, gid, 0o700)
        return tuple(notes)

    def _create_image(self, image: Path, uid: int, gid: int, kib: int) -> None:
        self.host.makedirs_owned(self.images_dir, 0, 0, 0o700)
        temp = image.with_name(image.name + ".new")
        self.host.remove_file(temp)
        self.host.atomic_write(temp, b"", uid=0, gid=0, mode=IMAGE_MODE)  # 0600 before it holds anything
        self.host.run(["truncate", "-s", f"{kib}K", str(temp)])
        self.host.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"root_owner={uid}:{gid}", str(temp)], timeout=300)
        self.host.run(["mv", "-f", "-T", str(temp), str(image)])
        log.info("event=image_created image=%s kib=%d", image, kib)

    def _mount(self, name: str, image: Path, home: Path, uid: int, gid: int) -> list[str]:
        """Mount ``image`` on ``home``, first carrying over what the home holds (as the sliver's
        uid: see the module docstring). Returns notes about what could not be carried over."""
        options = "loop,nosuid,nodev"
        notes: list[str] = []
        listing = self.host.run(["find", str(home), "-mindepth", "1", "-maxdepth", "1", "-print", "-quit"]).stdout
        if listing and listing.strip():
            with self._copying_lock:
                self._copying.add(name)
            try:
                notes += self._carry_over(name, image, home, uid, gid, options)
            finally:
                with self._copying_lock:
                    self._copying.discard(name)
        self.host.run(["mount", "-o", options, str(image), str(home)])
        log.info("event=image_mounted sliver=%s home=%s", name, home)
        return notes

    def _drop_lost_found(self, home: Path) -> None:
        """Remove the filesystem's ``lost+found`` (root's, in the sliver's home) from a mounted
        image; mkfs makes it, and so does every ``e2fsck`` that finds it missing."""
        lost = home / "lost+found"
        info = self.host.stat_file(lost)
        if info is not None and info.kind == "dir" and info.uid == 0:
            self.host.remove_dir(lost)

    def _carry_over(self, name: str, image: Path, home: Path, uid: int, gid: int, options: str) -> list[str]:
        """Copy the home's content into the image and delete it from under the mount point,
        both as ``uid``, never as root."""
        staging = self.staging_of(name)
        self._unmount_staging(name)  # a crashed earlier attempt
        self.host.makedirs_owned(staging, 0, 0, 0o700)
        self.host.run(["mount", "-o", options, str(image), str(staging)])
        try:
            self.host.makedirs_owned(staging, uid, gid, 0o700)  # the image's root: the sliver's, private
            copy = self.host.run_as(["cp", "-a", "--", f"{home}/.", f"{staging}/"], uid=uid, gid=gid, groups=[gid],
                                    timeout=600, check=False)
        finally:
            self._unmount_staging(name)
        notes = []
        if copy.returncode != 0:
            reason = copy.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
            notes.append(f"sliver {name}: part of the home was not carried into its disk image "
                         f"(copied as the sliver: {reason[0]})")
        self.host.run_as(["find", str(home), "-mindepth", "1", "-delete"], uid=uid, gid=gid, groups=[gid],
                         timeout=600, check=False)
        log.info("event=home_carried_over sliver=%s home=%s complete=%d", name, home, copy.returncode == 0)
        return notes

    def _unmount_staging(self, name: str) -> None:
        """Unmount (lazily when busy) and remove the staging point of ``name``. Idempotent."""
        staging = self.staging_of(name)
        if self.host.stat_file(staging) is None:
            return
        if str(staging) in {point for point, _ in self.host.mounts()}:
            if self.host.run(["umount", str(staging)], check=False).returncode != 0:
                self.host.run(["umount", "-l", str(staging)])
        self.host.remove_dir(staging)

    def release_home(self, name: str, home: Path | None = None) -> None:
        """Undo :meth:`prepare_home`: unmount and delete the image (image), or drop the user's
        limit (quota; needs the uid, so use :meth:`remove`). Call after the sliver's processes
        are gone and before ``userdel --remove``. Idempotent."""
        if self.mechanism() == "quota":
            return
        self._unmount_staging(name)
        self._release_image(name, home)

    def sweep(self, keep: Collection[str]) -> tuple[str, ...]:
        """Unmount and delete the images (and staging mounts) of every account not in ``keep``.

        ``keep`` holds the account names (prefix + sliver) of every sliver the store still has
        an owned account state for -- including slivers being created, so that a new image is
        never swept while its account is made. Called on every enforcement pass: it is what
        removes the image of a sliver destroyed while the daemon was down or killed between
        ``userdel`` and the image's removal. Returns the names swept. Idempotent."""
        keep = set(keep)
        names = {f.removesuffix(".new").removesuffix(GROW_SUFFIX).removesuffix(IMAGE_SUFFIX)
                 for f in self.host.file_stamps(self.images_dir)
                 if f.endswith((IMAGE_SUFFIX, IMAGE_SUFFIX + ".new", IMAGE_SUFFIX + GROW_SUFFIX))}
        staged = {d.removeprefix(STAGING_PREFIX) for d in self.host.list_dirs(self.home_root)
                  if d.startswith(STAGING_PREFIX)}
        with self._copying_lock:
            busy = set(self._copying)
        swept = []
        for name in sorted((names | staged) - keep - busy):
            self._unmount_staging(name)
            self._release_image(name)
            swept.append(name)
            log.warning("event=image_swept name=%s reason=no-sliver", name)
        for name in sorted(staged & keep - busy):  # a carry-over cut short by a crash
            self._unmount_staging(name)
        return tuple(swept)

    def _release_image(self, name: str, home: Path | None = None) -> None:
        """Unmount the image (from ``home`` and staging points; everywhere when ``home`` is
        None), detach its loop device and delete it. Idempotent."""
        image = self.image_of(name)
        device = self._loops().get(str(image))
        if device is not None:
            for target in self._targets(device):
                ours = home is None or target == str(home) or target.startswith(str(self.images_dir))
                if ours and self.host.run(["umount", target], check=False).returncode != 0:
                    self.host.run(["umount", "-l", target])
            leftover = self._loops().get(str(image))
            if leftover is not None:
                self.host.run(["losetup", "-d", leftover], check=False)
        self.host.remove_file(image)
        self.host.remove_file(image.with_name(image.name + ".new"))
        self.host.remove_file(grow_marker(image))

    def overcommit(self) -> str | None:
        """A note when the images could grow past the free space of their filesystem: the
        sum of what the sparse images may still allocate (size minus blocks in use) against
        the space available there; None when it fits (or there are no images)."""
        out = self.host.run(["find", str(self.images_dir), "-maxdepth", "1", "-name", f"*{IMAGE_SUFFIX}",
                             "-printf", "%s %b\n"], check=False).stdout
        growth = 0
        for line in (out or b"").decode().splitlines():
            size, _, blocks = line.partition(" ")
            if size.isdigit() and blocks.isdigit():
                growth += max(0, int(size) - 512 * int(blocks))
        if growth == 0:
            return None
        free = self.host.run(["stat", "-f", "-c", "%a %S", str(self.images_dir)], check=False).stdout
        fields = (free or b"").decode().split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            return None
        available = int(fields[0]) * int(fields[1])
        if growth <= available:
            return None
        return (f"disk images are overcommitted: they may still grow by {growth >> 20} MiB, but the filesystem "
                f"of {self.images_dir} has {available >> 20} MiB free; a sliver writing its quota may fail early")

    # --- the Enforcer port ----------------------------------------------------------------
    def apply(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> tuple[str, ...]:
        notes: list[str] = []
        failures: list[str] = []
        self._names = {uids[n]: n for n in rspecs if n in uids}
        for name, rspec in sorted(rspecs.items()):
            if homes is None or name not in homes or name not in uids:
                continue
            entry = self.host.getpwuid(uids[name])
            gid = entry.gid if entry is not None else uids[name]
            try:
                notes += self.prepare_home(name, uids[name], gid, homes[name], rspec.get("nm_disk_quota", 0))
            except BackendError as exc:
                failures.append(f"sliver {name}: disk: {exc}")
        if self.mechanism() == "image":
            overcommitted = self.overcommit()
            if overcommitted is not None:
                notes.append(overcommitted)
        if failures:
            raise BackendError("; ".join(failures))
        return tuple(notes)

    def remove(self, name: str, uid: int) -> None:
        if self.mechanism() == "quota":
            self.host.run(["setquota", "-u", str(uid), "0", "0", "0", "0", self._mount_point()])
            return
        self.release_home(name)

    def observed(self) -> dict[str, dict[str, int]]:
        if self.mechanism() == "quota":
            return self._observed_quota()
        out = self.host.run(["find", str(self.images_dir), "-maxdepth", "1", "-name", "*.img",
                             "-printf", "%f %s\n"], check=False).stdout
        loops = self._loops()
        result = {}
        for line in (out or b"").decode().splitlines():
            filename, _, size = line.rpartition(" ")
            if not size.isdigit():
                continue
            device = loops.get(str(self.images_dir / filename))
            result[filename.removesuffix(".img")] = {
                "nm_disk_quota": int(size) // 1024,
                "disk_mounted": int(device is not None and bool(self._targets(device))),
            }
        return result

    def _observed_quota(self) -> dict[str, dict[str, int]]:
        out = self.host.run(["repquota", "-u", "-n", self._mount_point()], check=False).stdout
        result = {}
        for line in (out or b"").decode().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[0].startswith("#") and fields[0][1:].isdigit():
                uid = int(fields[0][1:])
                if fields[4].isdigit() and int(fields[4]) > 0:
                    result[self._names.get(uid, f"uid {uid}")] = {"nm_disk_quota": int(fields[4]), "disk_used": int(fields[2])}
        return result
