"""CPU, memory and disk enforcement measured on the real kernel, and cleanup after removal.

Real accounts (prefix ``nmx``, always removed), a private cgroup parent group per test (so a real
node manager's ``nodemanager`` groups are never touched), a loop image per sliver home.
Programs run as a sliver use /usr/bin/python3 or shell tools (root's python may be private).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.limits import CpuEnforcer, MemoryEnforcer
from nodemanager.enforce.tasks import kill_and_remove
from nodemanager.enforce.disk import DiskEnforcer
from nodemanager.host import Host
from nodemanager.testing.accounts import ScratchAccount, scratch_accounts

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, accounts, loop mounts)"),
]

SYSTEM_PYTHON = "/usr/bin/python3"


Sliver = ScratchAccount


@pytest.fixture
def slivers(home_root: Path) -> Iterator[list[Sliver]]:
    """Three real accounts with homes under ``home_root``. Always removed."""
    with scratch_accounts(home_root, prefix="nmx") as made:
        yield made


@pytest.fixture
def tree(slivers: list[Sliver]) -> Iterator[CgroupTree]:
    host = Host()
    t = CgroupTree(host, ("cpu", "memory"), group=f"nmxtest{secrets.token_hex(3)}")
    for controller in ("cpu", "memory"):
        if t.missing(controller):
            pytest.skip(t.missing(controller) or "")
    try:
        yield t
    finally:
        for s in slivers:
            kill_and_remove(t, s.name, s.uid)
        for h in t.used():
            for name in host.list_dirs(t.parent(h)):
                kill_and_remove(t, name, None)
            host.remove_dir(t.parent(h))


def busy(tree: CgroupTree, sliver: Sliver, cpu: int = 0) -> None:
    Host().spawn_detached(["taskset", "-c", str(cpu), "/bin/sh", "-c", "while :; do :; done"],
                          uid=sliver.uid, gid=sliver.uid, home=sliver.home, env={"PATH": "/usr/bin:/bin"},
                          log_path=sliver.home / "busy.log", cgroups=tree.dirs(sliver.name))


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def split(tree: CgroupTree, a: Sliver, b: Sliver, seconds: float = 3.0) -> float:
    """a's part of the CPU time of a's and b's processes over ``seconds``."""
    deadline = time.monotonic() + 5
    groups = {s.name: tree.dirs(s.name)[-1] for s in (a, b)}
    while not all(tree.members(g) for g in groups.values()):
        assert time.monotonic() < deadline, "busy loops did not start"
        time.sleep(0.05)
    pids = {n: tree.members(g) for n, g in groups.items()}
    start = {n: cpu_ticks(p) for n, p in pids.items()}
    time.sleep(seconds)
    used = {n: cpu_ticks(p) - start[n] for n, p in pids.items()}
    return used[a.name] / max(1, used[a.name] + used[b.name])


def test_cpu_shares_one_to_three(tree: CgroupTree, slivers: list[Sliver]) -> None:
    a, b, _ = slivers
    CpuEnforcer(tree).apply({a.name: {"nm_cpu_share": 1}, b.name: {"nm_cpu_share": 3}}, {})
    busy(tree, a)
    busy(tree, b)
    part = split(tree, a, b)
    print(f"cpu shares 1:3 on one core: a {part:.3f} / b {1 - part:.3f}")
    assert abs(part - 0.25) <= 0.10


def test_cpu_guarantee_beats_a_high_share(tree: CgroupTree, slivers: list[Sliver]) -> None:
    a, b, _ = slivers
    enforcer = CpuEnforcer(tree)
    enforcer.apply({a.name: {"nm_cpu_share": 1, "nm_cpu_guaranteed_share": 600}, b.name: {"nm_cpu_share": 10}}, {})
    busy(tree, a)
    busy(tree, b)
    part = split(tree, a, b)
    print(f"cpu guarantee 600 vs share 10: a {part:.3f} / b {1 - part:.3f}")
    assert part >= 0.55
    assert enforcer.observed()[a.name]["nm_cpu_guaranteed_share"] >= 600


def test_memory_limit_kills_inside_the_sliver_only(tree: CgroupTree, slivers: list[Sliver]) -> None:
    a, b, _ = slivers
    MemoryEnforcer(tree).apply({a.name: {"nm_memory_max": 64 * 1024}, b.name: {"nm_memory_max": 0}}, {})
    CpuEnforcer(tree).apply({a.name: {}, b.name: {}}, {})
    hog_script = "import sys; sys.stdin.readline(); b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    hog = subprocess.Popen([SYSTEM_PYTHON, "-c", hog_script], user=a.uid, group=a.uid, extra_groups=[],
                           stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    other = subprocess.Popen(["sleep", "30"], user=b.uid, group=b.uid, extra_groups=[])
    try:
        moved = tree.place({a.name: a.uid, b.name: b.uid})  # the placement sweep catches both
        assert moved >= 2
        assert hog.pid in tree.members(tree.dirs(a.name)[-1])
        assert hog.stdin is not None
        hog.stdin.write(b"go\n")
        hog.stdin.close()
        assert hog.wait(timeout=30) == -9
        assert other.poll() is None
        print(f"memory 64 MiB: 256 MiB toucher exited {hog.returncode}; other sliver alive")
    finally:
        other.kill()
        other.wait()


def test_disk_image_limits_the_sliver_only(tmp_path: Path, slivers: list[Sliver]) -> None:
    a, b, _ = slivers
    disk = DiskEnforcer(Host(), a.home.parent, tmp_path / "images")
    assert disk.available() is None
    (a.home / "before.txt").write_text("kept")
    notes = disk.apply({a.name: {"nm_disk_quota": 20 * 1024}, b.name: {"nm_disk_quota": 40 * 1024}},
                       {a.name: a.uid, b.name: b.uid}, {a.name: a.home, b.name: b.home})
    try:
        assert notes == () and disk.mechanism() == "image"
        assert (a.home / "before.txt").read_text() == "kept"  # carried into the image
        assert os.stat(a.home).st_uid == a.uid
        write = ["dd", "if=/dev/zero", "bs=1M", "count=30", "status=none"]
        full = subprocess.run([*write, f"of={a.home}/big"], user=a.uid, group=a.uid, extra_groups=[],
                              capture_output=True, check=False)
        assert full.returncode != 0
        assert b"No space left on device" in full.stderr or b"Disk quota exceeded" in full.stderr
        fine = subprocess.run([*write, f"of={b.home}/big"], user=b.uid, group=b.uid, extra_groups=[],
                              capture_output=True, check=False)
        assert fine.returncode == 0, fine.stderr
        print(f"disk 20 MiB image: writing 30 MiB failed: {full.stderr.decode().strip()}")
        # growing the quota is applied online and shown as observed
        disk.apply({a.name: {"nm_disk_quota": 64 * 1024}}, {a.name: a.uid}, {a.name: a.home})
        assert disk.observed()[a.name] == {"nm_disk_quota": 64 * 1024, "disk_mounted": 1}
        assert os.statvfs(a.home).f_blocks * os.statvfs(a.home).f_frsize > 40 << 20
    finally:
        for s in (a, b):
            disk.release_home(s.name, s.home)
    assert not os.path.ismount(a.home) and not (tmp_path / "images" / f"{a.name}.img").exists()
    assert disk.observed() == {}


def test_removal_leaves_nothing(tree: CgroupTree, slivers: list[Sliver]) -> None:
    a, b, _ = slivers
    # 32 MiB held the fork loop's shells only by luck (the OOM killer could empty the group before
    # the check); the memory limit is not what this test is about
    rspecs = {a.name: {"nm_cpu_share": 2, "nm_memory_max": 256 * 1024}, b.name: {}}
    for enforcer in (CpuEnforcer(tree), MemoryEnforcer(tree)):
        enforcer.apply(rspecs, {})
    # a fork bomb-ish sliver: a loop that keeps starting children
    Host().spawn_detached(["/bin/sh", "-c", "while :; do sleep 0.01 & done"], uid=a.uid, gid=a.uid,
                          home=a.home, env={"PATH": "/usr/bin:/bin"}, log_path=a.home / "fork.log",
                          cgroups=tree.dirs(a.name))
    time.sleep(0.3)
    assert tree.members(tree.dirs(a.name)[0])
    CpuEnforcer(tree).remove(a.name, a.uid)
    MemoryEnforcer(tree).remove(a.name, a.uid)  # idempotent: already gone
    assert all(not d.exists() for d in tree.dirs(a.name))
    assert all(d.exists() for d in tree.dirs(b.name))
    assert Host().pids_of_uid(a.uid) == []  # live processes (zombies awaiting their reaper aside)
    assert a.name not in CpuEnforcer(tree).observed() and b.name in MemoryEnforcer(tree).observed()
