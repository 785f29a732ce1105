"""Destroying a sliver whose account an administrator removed behind the node's back succeeds,
also when its disk image is still mounted on its home.

With the account gone, ``destroy`` only removed the keys file and the orphan home; the home was
the mount point of the sliver's image, which nothing unmounted, so removing it failed ("Device or
resource busy") at every retry: the sliver stayed failed for ever, and its cgroups, image and
class with it (the sweep spares what an owned state still names). The enforcement state of a
vanished account is now removed as for any destroy, under the uid that owns its home.
"""

from __future__ import annotations

from pathlib import Path

from nodemanager.backends.account import AccountBackend
from nodemanager.config import parse_config
from nodemanager.enforce.set import EnforcementSet
from nodemanager.enforcing import EnforcementHooks
from nodemanager.testing.fakeauthority import make_sliver
from nodemanager.testing.kernel import KernelHost

HOMES = Path("/homes")


def test_destroy_of_a_vanished_account_unmounts_its_image_and_removes_its_home(tmp_path: Path) -> None:
    host = KernelHost()
    host.dirs[HOMES] = (0, 0, 0o755)
    config = parse_config({
        "node": {"data_dir": str(tmp_path), "log_file": ""},
        "api": {"tcp": "", "unix_socket": ""},
        "slivers": {"home_root": str(HOMES), "name_prefix": "nm", "uid_base": 200000, "keys_dir": "/keys"},
        "enforce": {"uplink": "eth0"},
    })
    enforcement = EnforcementSet.from_config(config, host)
    enforcement.probe()
    assert enforcement.problems() == []
    backend = AccountBackend.from_config(config, host,
                                         hooks=EnforcementHooks(enforcement, lambda: None, lambda n: "nm" + n))
    sliver = make_sliver("site_a", slice_id=10, attributes=[("nm_disk_quota", "10240")])
    uid = backend.create(sliver)
    home = HOMES / "nmsite_a"
    assert [m.target for m in host.storage.mounts] == [home]
    host.add_process(uid, cwd=home)  # a login, still running when the account is removed
    host.users.pop("nmsite_a")  # an administrator's userdel, behind the node's back
    host.groups.pop("nmsite_a")
    backend.destroy("site_a")
    assert host.storage.mounts == [] and host.storage.loops == {}
    assert home not in host.dirs
    assert not host.pids_of_uid(uid)
    assert not any(p.name.startswith("nmsite_a") for p in host.files if p.parent == config.data_dir / "images")
