"""What happens on the simulated machine without the node: slivers using their accounts, and
what an earlier node left behind before the first one of a scenario boots.

None of it is an effect of the node (nothing here is counted or can crash): it happens whatever
the node does, exactly as in every run of a scenario.
"""

from __future__ import annotations

from pathlib import Path

from nodemanager.core.allocation import classid_minors
from nodemanager.core.records import Sliver
from nodemanager.enforce.bandwidth import nft_script

from .harness import HOME_ROOT, PREFIX, UID_BASE, Run, World

#: The uid of a sliver that is gone, whose state nothing in the store remembers.
STRAY_UID = UID_BASE + 77
STRAY, HALF, GONE, ATTACHED = (PREFIX + n for n in ("site_stray", "site_half", "site_gone", "site_loop"))


def sliver_writes_home(victim: Sliver):  # noqa: ANN201 - a Step
    """The sliver writes files in its home (they must survive whatever the node does to it,
    moving it onto a disk image included)."""

    def step(run: Run) -> None:
        host = run.world.host
        entry = host.users.get(PREFIX + victim.name)
        if entry is None:
            return
        home = Path(entry.home)
        host.dirs[home / "project"] = (entry.uid, entry.gid, 0o750)
        for path, data in ((home / "notes", b"mine"), (home / "project" / "data.csv", b"1,2,3\n")):
            host.add_file(path, data, uid=entry.uid, gid=entry.gid, mode=0o640)
            run.world.expect[path] = (victim.name, data)

    return step


def sliver_litters(victim: Sliver):  # noqa: ANN201 - a Step
    """The sliver leaves things outside its home: files in /tmp and /var/tmp, a crontab, SysV
    shared memory, a queue and semaphores, and a login the placement listener did not see (in
    none of its groups)."""

    def step(run: Run) -> None:
        host = run.world.host
        entry = host.users.get(PREFIX + victim.name)
        if entry is None:
            return
        uid, gid = entry.uid, entry.gid
        cache = Path("/var/tmp") / f"cache-{victim.name}"
        host.dirs[cache] = (uid, gid, 0o700)
        written = {Path("/tmp") / f"scratch-{victim.name}": b"scratch", cache / "blob": b"blob",
                   Path("/dev/shm") / f"seg-{victim.name}": b"shm",
                   Path("/var/spool/cron/crontabs") / entry.name: b"* * * * * true\n"}
        for path, data in written.items():
            host.add_file(path, data, uid=uid, gid=gid, mode=0o600)
            run.world.expect[path] = (victim.name, data)
        for kind in ("shm", "msg", "sem"):
            host.ipc.add(kind, uid, gid)
        host.add_process(uid, cwd=Path(entry.home))

    return step


def sliver_ignores_term(victim: Sliver):  # noqa: ANN201 - a Step
    """The sliver's processes ignore SIGTERM: stopping it takes the cgroup (``cgroup.kill``, or
    the freezer and SIGKILL)."""

    def step(run: Run) -> None:
        host = run.world.host
        entry = host.users.get(PREFIX + victim.name)
        if entry is not None:
            host.ignore_term.update(host.pids_of_uid(entry.uid))

    return step


def seed_strays(world: World) -> None:
    """An earlier node died and its store was lost: a sliver it had (uid ``STRAY_UID``) still has
    its groups in every hierarchy with a process in them working in its home, its image mounted
    on that home, its HTB class and nft map entry; another's image is still mounted at a staging
    point; a third's image was never finished (``.img.new``); a fourth's is attached to a loop
    device that is not auto-cleared (``losetup -f``), mounted nowhere. Nothing in the store knows
    them."""
    host = world.host
    images = world.config.data_dir / "images"
    home = HOME_ROOT / STRAY
    host.dirs[images] = (0, 0, 0o700)
    host.dirs[home] = (STRAY_UID, STRAY_UID, 0o700)
    for name, target in ((STRAY, home), (HALF, HOME_ROOT / f".nodemanager-staging-{HALF}")):
        image = str(images / f"{name}.img")
        host.run(["truncate", "-s", "10240K", image])
        host.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", f"root_owner={STRAY_UID}:{STRAY_UID}", image])
        host.run(["chmod", "600", image])
        host.dirs.setdefault(target, (0, 0, 0o700))
        host.run(["mount", "-o", "loop,nosuid,nodev", image, str(target)])
    host.add_file(home / "data", b"old", uid=STRAY_UID, gid=STRAY_UID, mode=0o600)  # on the image
    host.run(["truncate", "-s", "10240K", str(images / f"{GONE}.img.new")])
    attached = str(images / f"{ATTACHED}.img")
    host.run(["truncate", "-s", "10240K", attached])
    host.run(["mkfs.ext4", "-q", "-F", "-m", "0", attached])
    host.storage.attach(Path(attached))
    groups = [h.mount / "nodemanager" / STRAY for h in host.hierarchies]
    for group in groups:
        host.makedirs_owned(group, 0, 0, 0o755)
    host.add_process(STRAY_UID, cwd=home, cgroups=groups)
    minor = classid_minors({STRAY: STRAY_UID})[STRAY]
    host.run(["tc", "-batch", "-"], input=(
        "qdisc replace dev eth0 root handle 1: htb default 2\n"
        "class replace dev eth0 parent 1: classid 1:1 htb rate 10000000kbit ceil 10000000kbit quantum 1514\n"
        "class replace dev eth0 parent 1:1 classid 1:2 htb rate 8kbit ceil 10000000kbit quantum 1514\n"
        f"class replace dev eth0 parent 1:1 classid 1:{minor:x} htb rate 5000kbit ceil 10000kbit quantum 1514\n"
    ).encode())
    host.run(["nft", "-f", "-"], input=nft_script("nodemanager", {STRAY_UID: minor}).encode())
    assert not host.unmodelled, host.unmodelled
    world.foreign["homes"] = [STRAY]  # a home the node never knew is not its to remove
