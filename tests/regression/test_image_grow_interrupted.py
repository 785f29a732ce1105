"""A disk image whose growth was cut short by a crash is grown at the next apply.

Growing an image takes three steps: ``truncate`` the file to the new quota, ``losetup -c`` so
the loop device sees it, ``resize2fs`` so the filesystem fills it. The enforcer judged an image's
size by its file alone, so a daemon killed after the ``truncate`` left a filesystem of the old
size in a file of the new one, and every later apply took the quota as met: the sliver kept the
old limit for ever (and ``status`` showed the new one). A grow is now marked before its first
step and unmarked after its last; a marked image is grown again, whatever its file's size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemanager.enforce.disk import DiskEnforcer
from nodemanager.testing.kernel import KernelHost

HOMES, IMAGES, UID = Path("/homes"), Path("/var/lib/nm/images"), 200010


class Killed(BaseException):
    """The daemon died (kill -9): nothing after this point runs."""


class DiesAt(KernelHost):
    """A machine on which the daemon dies when it is about to run ``program``."""

    die_at: tuple[str, ...] | None = None

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        if self.die_at is not None and tuple(argv[: len(self.die_at)]) == self.die_at:
            self.die_at = None
            raise Killed(" ".join(argv))
        return super().run(argv, **kwargs)


@pytest.mark.parametrize(("online", "dies_before"), [
    (True, ("losetup", "-c")), (True, ("resize2fs",)),
    # without CAP_SYS_RESOURCE (containers): offline, the home unmounted meanwhile
    (False, ("e2fsck",)), (False, ("mount",)),
])
def test_a_grow_cut_short_is_finished_after_the_restart(online: bool, dies_before: tuple[str, ...]) -> None:
    host = DiesAt()
    host.storage.online_resize = online
    host.dirs[HOMES] = (0, 0, 0o755)
    home = HOMES / "acct"
    disk = DiskEnforcer(host, HOMES, IMAGES)
    assert disk.available() is None
    disk.prepare_home("acct", UID, UID, home, 10240)
    host.die_at = dies_before
    with pytest.raises(Killed):
        disk.prepare_home("acct", UID, UID, home, 20480)
    restarted = DiskEnforcer(host, HOMES, IMAGES)
    restarted.prepare_home("acct", UID, UID, home, 20480)
    volume = host.storage.volume(disk.image_of("acct"))
    assert volume is not None and volume.fs_size == 20480 * 1024
    assert [m.target for m in host.storage.mounts] == [home]
    assert sorted(p.name for p in host.files if p.parent == IMAGES) == ["acct.img"]  # no marker left
    host.commands.clear()
    restarted.prepare_home("acct", UID, UID, home, 20480)
    assert not [c for c in host.commands if c[0] in ("truncate", "resize2fs") or c[:2] == ["losetup", "-c"]]
