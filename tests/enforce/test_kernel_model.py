"""The machine model (``nodemanager.testing.kernel``) behaves like the kernel and tools it stands
for: what the crash simulation concludes is only as good as this."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodemanager.backends.leftovers import ipc_objects
from nodemanager.core.errors import BackendError
from nodemanager.enforce.bandwidth import nft_script, parse_classes, parse_priority_map
from nodemanager.testing.kernel import LAYOUTS, CgroupHost, KernelHost
from nodemanager.testing.kernel.net import sprint_rate

IMAGE, HOME = Path("/images/a.img"), Path("/homes/a")
UID = 200010


def tc_batch(host: KernelHost, *lines: str, check: bool = True) -> int:
    return host.run(["tc", "-batch", "-"], input=("\n".join(lines) + "\n").encode(), check=check).returncode


# --- tc and nft --------------------------------------------------------------------------------
def test_rates_print_as_tc_prints_them() -> None:
    assert [sprint_rate(k * 1000) for k in (8, 1500, 10_000_000, 4_999_996, 2_500_000, 123_456)] == \
        ["8Kbit", "1500Kbit", "10Gbit", "4999Mbit", "2500Mbit", "123456Kbit"]


def test_htb_classes_read_back_through_the_enforcers_parser() -> None:
    host = KernelHost()
    tc_batch(host, "qdisc replace dev eth0 root handle 1: htb default 2",
             "class replace dev eth0 parent 1: classid 1:1 htb rate 10000000kbit ceil 10000000kbit quantum 1514",
             "class replace dev eth0 parent 1:1 classid 1:1a htb rate 8kbit ceil 2500kbit quantum 3028")
    classes = parse_classes(host.run(["tc", "-d", "class", "show", "dev", "eth0"]).stdout.decode())
    assert {m: (p, c.rate_kbit, c.ceil_kbit, c.quantum) for m, (p, c) in classes.items()} == {
        1: (None, 10_000_000, 10_000_000, 1514), 0x1a: (1, 8, 2500, 3028)}  # an inner class prints no quantum
    (qdisc,) = json.loads(host.run(["tc", "-j", "qdisc", "show", "dev", "eth0"]).stdout)
    assert (qdisc["kind"], qdisc["handle"], qdisc["options"]["default"]) == ("htb", "1:", "0x2")


def test_tc_keeps_a_class_parent_refuses_deleting_a_parent_and_stops_a_batch_at_its_first_error() -> None:
    host = KernelHost()
    tc_batch(host, "qdisc replace dev eth0 root handle 1: htb default 2",
             "class replace dev eth0 parent 1: classid 1:1 htb rate 100kbit ceil 100kbit quantum 1514",
             "class replace dev eth0 parent 1:1 classid 1:10 htb rate 8kbit ceil 100kbit quantum 1514")
    assert tc_batch(host, "class replace dev eth0 parent 1: classid 1:10 htb rate 9kbit ceil 90kbit quantum 1514",
                    "class del dev eth0 classid 1:1",  # has a child: refused, and the batch stops
                    "class del dev eth0 classid 1:10", check=False) == 1
    classes = host.net.devices["eth0"].classes
    assert sorted(classes) == [1, 0x10] and (classes[0x10].parent, classes[0x10].rate_kbit) == (1, 9)
    assert host.run(["tc", "class", "del", "dev", "eth0", "classid", "1:99"], check=False).returncode == 2
    tc_batch(host, "qdisc replace dev eth0 root handle 1: htb default 3")  # same handle: classes stay
    assert sorted(host.net.devices["eth0"].classes) == [1, 0x10]
    host.run(["tc", "qdisc", "del", "dev", "eth0", "root"])
    assert host.net.devices["eth0"].classes == {}
    assert host.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False).returncode == 2  # the default


def test_nft_scripts_apply_atomically_and_list_in_nft_json() -> None:
    host = KernelHost()
    host.run(["nft", "-f", "-"], input=nft_script("nm", {200010: 0x1a, 200011: 0x1b}).encode())
    listed = host.run(["nft", "-j", "list", "table", "inet", "nm"]).stdout.decode()
    assert parse_priority_map(listed) == {200010: 0x1a, 200011: 0x1b}
    bad = nft_script("nm", {}).replace("policy accept;",
                                       "policy accept;\n    meta priority set meta skuid map { x : 1:1 }")
    assert host.run(["nft", "-f", "-"], input=bad.encode(), check=False).returncode == 1
    assert host.net.priority_map("inet", "nm") == {200010: 0x1a, 200011: 0x1b}  # all or nothing
    host.run(["nft", "-f", "-"], input=nft_script("nm", {}).encode())
    assert parse_priority_map(host.run(["nft", "-j", "list", "table", "inet", "nm"]).stdout.decode()) == {}
    host.run(["nft", "delete", "table", "inet", "nm"])
    assert host.run(["nft", "-j", "list", "table", "inet", "nm"], check=False).returncode == 1
    assert host.run(["nft", "list", "tables"]).stdout == b""


def test_unknown_commands_fail_loudly_and_are_listed() -> None:
    host = KernelHost()
    assert host.run(["tc", "filter", "add", "dev", "eth0"], check=False).returncode == 127
    assert host.run(["iptables", "-L"], check=False).returncode == 127
    assert host.unmodelled == ["tc filter add dev eth0", "iptables -L"]


# --- disk images, loop devices, mounts ------------------------------------------------------------
def image_host() -> KernelHost:
    host = KernelHost()
    host.dirs[Path("/images")] = (0, 0, 0o700)
    host.dirs[Path("/homes")] = (0, 0, 0o755)
    host.dirs[HOME] = (UID, UID, 0o700)
    host.run(["truncate", "-s", "10240K", str(IMAGE)])
    host.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"root_owner={UID}:{UID}", str(IMAGE)])
    return host


def test_a_mount_hides_what_the_target_held_and_keeps_what_is_written_on_the_image() -> None:
    host = image_host()
    host.add_file(HOME / "before", b"under", uid=UID)
    host.run(["mount", "-o", "loop,nosuid,nodev", str(IMAGE), str(HOME)])
    assert HOME / "before" not in host.files and HOME / "lost+found" in host.dirs
    host.add_file(HOME / "after", b"on the image", uid=UID)
    assert host.run(["findmnt", "-n", "-l", "-o", "TARGET", "-S", "/dev/loop0"]).stdout == f"{HOME}\n".encode()
    host.run(["umount", str(HOME)])
    assert host.files[HOME / "before"].data == b"under" and HOME / "after" not in host.files
    assert host.storage.loops == {}  # auto-cleared with its last mount
    host.run(["mount", "-o", "loop", str(IMAGE), str(HOME)])
    assert host.files[HOME / "after"].data == b"on the image" and HOME / "before" not in host.files


def test_a_busy_mount_is_only_detached_lazily_and_its_loop_device_outlives_the_processes() -> None:
    host = image_host()
    host.run(["mount", "-o", "loop", str(IMAGE), str(HOME)])
    pid = host.add_process(UID, cwd=HOME / "sub")
    assert host.run(["umount", str(HOME)], check=False).returncode == 32
    assert host.run(["losetup", "-d", "/dev/loop0"]).returncode == 0 and "/dev/loop0" in host.storage.loops
    host.run(["umount", "-l", str(HOME)])
    assert host.storage.mounts == [] and "/dev/loop0" in host.storage.loops
    host.remove_file(IMAGE)
    devices = json.loads(host.run(["losetup", "-J", "-l", "-O", "NAME,BACK-FILE"]).stdout)["loopdevices"]
    assert devices == [{"name": "/dev/loop0", "back-file": f"{IMAGE} (deleted)"}]
    host.kill(pid, 9)
    assert host.run(["losetup", "-J", "-l", "-O", "NAME,BACK-FILE"]).stdout == b""


def test_growing_needs_the_file_the_loop_device_and_the_filesystem() -> None:
    host = image_host()
    host.run(["mount", "-o", "loop", str(IMAGE), str(HOME)])
    volume = host.storage.volume(IMAGE)
    assert volume is not None
    host.run(["truncate", "-s", "20480K", str(IMAGE)])
    host.run(["resize2fs", "/dev/loop0"])
    assert volume.fs_size == 10240 * 1024 and host.stat_file(IMAGE).size == 20480 * 1024  # type: ignore[union-attr]
    host.run(["losetup", "-c", "/dev/loop0"])
    host.run(["resize2fs", "/dev/loop0"])
    assert volume.fs_size == 20480 * 1024
    host.run(["umount", str(HOME)])
    host.run(["truncate", "-s", "30720K", str(IMAGE)])
    assert host.run(["resize2fs", str(IMAGE)], check=False).returncode == 1  # e2fsck -f first
    host.run(["e2fsck", "-f", "-p", str(IMAGE)])
    host.run(["resize2fs", str(IMAGE)])
    assert volume.fs_size == 30720 * 1024


def test_what_runs_as_the_sliver_has_the_sliver_s_rights() -> None:
    host = image_host()
    host.dirs[HOME / "docs"] = (UID, UID, 0o700)
    host.add_file(HOME / "docs" / "mine", b"1", uid=UID, gid=UID, mode=0o600)
    host.add_file(HOME / "secret", b"2", uid=0, gid=0, mode=0o600)
    staging = Path("/homes/.staging")
    host.dirs[staging] = (0, 0, 0o700)
    host.run(["mount", "-o", "loop", str(IMAGE), str(staging)])
    host.makedirs_owned(staging, UID, UID, 0o700)
    copy = host.run_as(["cp", "-a", "--", f"{HOME}/.", f"{staging}/"], uid=UID, gid=UID, check=False)
    assert copy.returncode == 1 and b"secret" in copy.stderr
    assert host.files[staging / "docs" / "mine"].data == b"1" and staging / "secret" not in host.files
    host.dirs[HOME / "rootdir"] = (0, 0, 0o755)
    host.add_file(HOME / "rootdir" / "x", uid=0)
    removed = host.run_as(["find", str(HOME), "-mindepth", "1", "-delete"], uid=UID, gid=UID, check=False)
    assert removed.returncode == 1
    assert sorted(str(p.relative_to(HOME)) for p in [*host.files, *host.dirs] if str(p).startswith(f"{HOME}/")) == \
        ["rootdir", "rootdir/x"]  # what root keeps in a directory of root's; "secret" was the sliver's to unlink


def test_a_mount_point_is_never_removed() -> None:
    host = image_host()
    host.run(["mount", "-o", "loop", str(IMAGE), str(HOME)])
    host.add_file(HOME / "f", uid=UID)
    with pytest.raises(BackendError, match="busy"):
        host.remove_tree(HOME)
    assert HOME in host.dirs and HOME / "f" not in host.files  # what was under it is gone
    with pytest.raises(BackendError, match="busy"):
        host.remove_dir(HOME)
    host.add_user("nma", UID, home=str(HOME))
    assert host.run(["userdel", "--remove", "nma"], check=False).returncode == 12


# --- cgroupfs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cgroup_files_take_what_the_kernel_takes(layout: str) -> None:
    host = CgroupHost(LAYOUTS[layout])
    cpu = next(h for h in host.hierarchies if "cpu" in h.controllers)
    memory = next(h for h in host.hierarchies if "memory" in h.controllers)
    if cpu.version == 2:
        host.write_text(cpu.mount / "cgroup.subtree_control", "+cpu +memory +pids")
    host.makedirs_owned(cpu.mount / "nm" / "a", 0, 0, 0o755)  # the missing parent becomes a group too
    host.makedirs_owned(memory.mount / "nm" / "a", 0, 0, 0o755)
    if cpu.version == 1:
        host.write_text(cpu.mount / "nm" / "a" / "cpu.shares", "1")
        assert host.read_file(cpu.mount / "nm" / "a" / "cpu.shares") == b"2"  # clamped
        host.write_text(memory.mount / "nm" / "a" / "memory.limit_in_bytes", "-1")
        assert host.read_file(memory.mount / "nm" / "a" / "memory.limit_in_bytes") == b"9223372036854771712"
    else:
        with pytest.raises(BackendError, match="cpu.weight"):  # nm does not hand cpu down yet
            host.write_text(cpu.mount / "nm" / "a" / "cpu.weight", "100")
        pid = host.add_process(UID)
        host.write_text(cpu.mount / "nm" / "cgroup.procs", str(pid))
        with pytest.raises(BackendError, match="busy"):  # no processes where controllers are handed down
            host.write_text(cpu.mount / "nm" / "cgroup.subtree_control", "+cpu")
        host.write_text(cpu.mount / "cgroup.procs", str(pid))
        host.write_text(cpu.mount / "nm" / "cgroup.subtree_control", "+cpu +memory")
        assert host.read_file(cpu.mount / "nm" / "a" / "cpu.weight") == b"100"  # the child has its files now
    with pytest.raises(BackendError, match="Invalid argument"):
        host.write_text(memory.mount / "nm" / "a" / ("memory.max" if memory.version == 2 else "memory.limit_in_bytes"),
                        "lots")
    with pytest.raises(BackendError, match="busy"):
        host.remove_dir(memory.mount / "nm")  # it has a child group
    with pytest.raises(BackendError, match="setsid"):
        host.spawn_detached(["x"], uid=UID, gid=UID, home=HOME, env={}, log_path=HOME / "log",
                            cgroups=[memory.mount / "nm" / "missing"])


def test_sysv_ipc_objects_are_listed_as_proc_lists_them_and_removed_by_ipcrm() -> None:
    host = KernelHost()
    shm, msg = host.ipc.add("shm", UID), host.ipc.add("msg", 1000, creator=UID)
    host.ipc.add("sem", 1000)
    assert sorted(ipc_objects(host, UID)) == sorted([("-m", shm), ("-q", msg)])
    host.run(["ipcrm", "-m", str(shm)])
    assert host.run(["ipcrm", "-m", str(shm)], check=False).returncode == 1
    assert ipc_objects(host, UID) == [("-q", msg)]


def test_kernel_interface_files_are_not_created_by_writing_and_directories_not_removed_with_content() -> None:
    host = KernelHost()
    with pytest.raises(BackendError, match="No such file"):
        host.write_text(Path("/proc/sys/kernel/nothing"), "1")
    host.dirs[Path("/d")] = (0, 0, 0o755)
    host.add_file(Path("/d/f"))
    with pytest.raises(BackendError, match="not empty"):
        host.remove_dir(Path("/d"))


def test_a_loop_device_attached_by_losetup_stays_until_detached() -> None:
    host = image_host()
    device = host.storage.attach(IMAGE)
    host.run(["findmnt", "-V"])  # any command: auto-clearing would happen here
    assert device in host.storage.loops
    host.run(["losetup", "-d", device])
    assert host.storage.loops == {}
    assert host.run(["losetup", "-d", device], check=False).returncode == 1
