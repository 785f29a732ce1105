"""A home on a disk image has no root-owned ``lost+found`` in it: not after a daemon killed right
after mounting the image, not after an offline grow.

The image's ``lost+found`` (a directory of root's in the sliver's home) was removed only right
after the mount that ``prepare_home`` makes when the image is not mounted yet. A daemon killed
between that mount and the removal left it for ever (the next start finds the image mounted);
and growing an image offline (where online resizing is refused, as in containers without
CAP_SYS_RESOURCE) runs ``e2fsck -f -p``, which makes ``lost+found`` again, then mounts the image
back. Found by the crash simulation and by comparing the machine model with this machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemanager.enforce.disk import DiskEnforcer
from nodemanager.testing.kernel import KernelHost

HOMES, IMAGES, UID = Path("/homes"), Path("/var/lib/nm/images"), 200010


class Killed(BaseException):
    """The daemon died (kill -9)."""


class DiesAfterMount(KernelHost):
    die = True

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        result = super().run(argv, **kwargs)
        if self.die and argv[:1] == ["mount"]:
            self.die = False
            raise Killed()
        return result


def machine(host: KernelHost) -> DiskEnforcer:
    host.dirs[HOMES] = (0, 0, 0o755)
    disk = DiskEnforcer(host, HOMES, IMAGES)
    assert disk.available() is None
    return disk


def test_a_mount_cut_short_by_a_crash_leaves_no_lost_and_found() -> None:
    host = DiesAfterMount()
    with pytest.raises(Killed):
        machine(host).prepare_home("acct", UID, UID, HOMES / "acct", 10240)
    assert HOMES / "acct" / "lost+found" in host.dirs
    DiskEnforcer(host, HOMES, IMAGES).prepare_home("acct", UID, UID, HOMES / "acct", 10240)
    assert HOMES / "acct" / "lost+found" not in host.dirs


def test_an_offline_grow_leaves_no_lost_and_found_in_the_home() -> None:
    host = KernelHost()
    host.storage.online_resize = False
    disk = machine(host)
    home = HOMES / "acct"
    disk.prepare_home("acct", UID, UID, home, 10240)
    assert home / "lost+found" not in host.dirs
    assert disk.prepare_home("acct", UID, UID, home, 20480) == ()
    assert host.storage.volume(disk.image_of("acct")).fs_size == 20480 * 1024  # type: ignore[union-attr]
    assert [p.name for p in host.dirs if p.parent == home] == []
