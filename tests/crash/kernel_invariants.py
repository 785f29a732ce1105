"""What must hold of the kernel objects after a crash and a restart (issue 11, "every live sliver
is enforced, and nothing of a sliver that is gone remains"), read from the machine model.

For every live sliver (a managed account): its group exists in every hierarchy the node uses,
with the limits of its effective RSpec (the CPU weight the enforcer's arithmetic gives it, its
memory limit, ``pids.max``), unfrozen, holding every process of its uid; it has exactly one HTB
class with the plan's rate, ceil and quantum and the nft map sends its uid there; and when its
``nm_disk_quota`` is above 0, its image is mounted on its home (once), root-owned 0600, with a
filesystem at least the quota's size filling its file (not half grown), and no ``lost+found`` of
root's in the home. What live slivers wrote (in their homes, in /tmp...) is still theirs.

Of everything else -- slivers that are gone, strays of slivers the node never knew -- nothing
remains: no group under our parent in any hierarchy, no HTB class or map entry, no mount under
the home root or the images directory, no loop device, no image file, no keys file, no home, no
file owned by its uid in the shared directories or spools, no SysV IPC object of its uid.

And the machine has converged: another full enforcement pass changes nothing, and the model
never met a command it does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from nodemanager.core.allocation import V1_WEIGHTS, V2_WEIGHTS, cpu_weights
from nodemanager.daemon import Node
from nodemanager.enforce.bandwidth import BandwidthEnforcer
from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.testing.kernel.host import SHARED_DIRS, SPOOL_DIRS

from .harness import HOME_ROOT, PREFIX, UID_BASE, World

Check = Callable[[World, Node, set[str]], list[str]]


def _uid_is_ours(uid: int) -> bool:
    return uid >= UID_BASE


def check_model(world: World, node: Node, live: set[str]) -> list[str]:
    return [f"a command the machine model does not know: {c}" for c in world.host.unmodelled]


def check_cgroups(world: World, node: Node, live: set[str]) -> list[str]:
    host, tree, loop = world.host, node.enforcement.tree if node.enforcement else None, node.enforcement_loop
    if tree is None or loop is None:
        return ["cgroups are not in use: the simulation enforces nothing"]
    problems: list[str] = []
    rspecs, uids, _ = loop.targets()
    accounts = {PREFIX + name for name in live}
    for h in host.hierarchies:
        for child in host.list_dirs(tree.parent(h)):
            if child not in accounts:
                problems.append(f"cgroup {tree.parent(h) / child} of no live sliver remains")
    cpu = tree.hierarchy_for("cpu")
    if cpu is not None:
        scale = V2_WEIGHTS if cpu.version == 2 else V1_WEIGHTS
        plan = cpu_weights({n: r.get("nm_cpu_share", 1) for n, r in rspecs.items()},
                           {n: r.get("nm_cpu_guaranteed_share", 0) for n, r in rspecs.items()}, scale)
        knob = "cpu.weight" if cpu.version == 2 else "cpu.shares"
        if rspecs and tree.read(tree.parent(cpu) / knob) != str(plan.parent):
            problems.append(f"parent {knob} is {tree.read(tree.parent(cpu) / knob)}, not {plan.parent}")
    for account in sorted(accounts):
        rspec, uid = rspecs.get(account), uids.get(account)
        if rspec is None or uid is None:
            problems.append(f"{account}: live but not among enforcement's targets")
            continue
        for h in tree.used():
            group = tree.parent(h) / account
            if not host.is_group(group):
                problems.append(f"{account}: no group {group}")
                continue
            if host.is_frozen(group):
                problems.append(f"{account}: group {group} left frozen")
            for pid in host.pids_of_uid(uid):
                if host.group_of(pid, h) != group:
                    problems.append(f"{account}: process {pid} is in {host.group_of(pid, h)}, not {group}")
        problems += _limits(tree, account, rspec, plan.children.get(account) if cpu is not None else None)
    return problems


def _limits(tree: CgroupTree, account: str, rspec: Mapping[str, int], weight: int | None) -> list[str]:
    wanted: dict[str, str] = {}
    cpu, memory, pids = (tree.hierarchy_for(c) for c in ("cpu", "memory", "pids"))
    if cpu is not None and weight is not None:
        wanted[str(tree.parent(cpu) / account / ("cpu.weight" if cpu.version == 2 else "cpu.shares"))] = str(weight)
    if memory is not None:
        kib = rspec.get("nm_memory_max", 0)
        knob = "memory.max" if memory.version == 2 else "memory.limit_in_bytes"
        unlimited = "max" if memory.version == 2 else "9223372036854771712"
        wanted[str(tree.parent(memory) / account / knob)] = str(kib * 1024) if kib > 0 else unlimited
    if pids is not None:
        wanted[str(tree.parent(pids) / account / "pids.max")] = str(max(1, rspec.get("nm_pids_max", 1024)))
    return [f"{account}: {path} is {tree.read(Path(path))}, not {value}"
            for path, value in sorted(wanted.items()) if tree.read(Path(path)) != value]


def check_bandwidth(world: World, node: Node, live: set[str]) -> list[str]:
    enforcer = next((e for e in node.enforcement.enforcers if isinstance(e, BandwidthEnforcer)), None) \
        if node.enforcement else None
    loop = node.enforcement_loop
    if enforcer is None or loop is None:
        return ["bandwidth is not enforced: the simulation enforces nothing"]
    rspecs, uids, _ = loop.targets()
    plan, priorities = enforcer.plan(rspecs, uids)
    device = world.host.net.devices[enforcer.device()]
    mapped = world.host.net.priority_map("inet", enforcer.table)
    problems: list[str] = []
    if (device.kind, device.handle, device.default) != ("htb", 1, 2):
        return [f"uplink root qdisc is {device.kind} {device.handle}: default {device.default}, not htb 1: default 2"]
    wanted = {plan.root.minor: (None, plan.root), plan.default.minor: (plan.root.minor, plan.default)}
    wanted.update({c.minor: (plan.root.minor, c) for c in plan.slivers.values()})
    for minor, cls in sorted(device.classes.items()):
        if minor not in wanted:
            problems.append(f"HTB class 1:{minor:x} of no live sliver remains")
            continue
        parent, want = wanted[minor]
        if (cls.parent, cls.rate_kbit, cls.ceil_kbit, cls.quantum) != (parent, want.rate_kbit, want.ceil_kbit,
                                                                        want.quantum):
            problems.append(f"HTB class 1:{minor:x} is {cls}, not {want} under {parent}")
    for minor in sorted(set(wanted) - set(device.classes)):
        problems.append(f"HTB class 1:{minor:x} is missing")
    if mapped != priorities:
        problems.append(f"nft priority map {mapped} != plan {priorities}")
    live_uids = {uids[PREFIX + n] for n in live if PREFIX + n in uids}
    problems += [f"nft map entry of uid {uid} (no live sliver) remains" for uid in sorted(set(mapped) - live_uids)]
    return problems


def check_disk(world: World, node: Node, live: set[str]) -> list[str]:
    enforcer = node.enforcement.disk if node.enforcement else None
    loop = node.enforcement_loop
    if enforcer is None or loop is None:
        return ["disk is not enforced: the simulation enforces nothing"]
    host, storage = world.host, world.host.storage
    storage.gc()  # a lazily unmounted image's loop device goes once its last process has
    rspecs, uids, homes = loop.targets()
    accounts = {PREFIX + name for name in live}
    problems: list[str] = []
    live_images = {enforcer.image_of(a) for a in accounts}
    for account in sorted(accounts):
        quota = rspecs.get(account, {}).get("nm_disk_quota", 0)
        image = enforcer.image_of(account)
        volume = storage.volume(image)
        mounted = [m for m in storage.mounts if m.target == homes.get(account)]
        if len(mounted) > 1:
            problems.append(f"{account}: {len(mounted)} mounts on its home")
        if quota <= 0:
            continue
        info = host.stat_file(image)
        if volume is None or info is None:
            problems.append(f"{account}: quota {quota} KiB but no image {image}")
            continue
        if (info.uid, info.mode) != (0, 0o600):
            problems.append(f"{account}: image {image} is {info.uid} {info.mode:o}, not root 600")
        if not mounted or mounted[-1].loop.volume is not volume:
            problems.append(f"{account}: its image is not mounted on its home {homes.get(account)}")
        if volume.fs_size < quota * 1024 or volume.fs_size != volume.size:  # short, or half grown
            problems.append(f"{account}: image filesystem of {volume.fs_size // 1024} KiB in a file of "
                            f"{volume.size // 1024} KiB for a quota of {quota} KiB")
        home = homes.get(account)
        if home is not None and host.dirs.get(home, (None,))[0] != uids.get(account):
            problems.append(f"{account}: home {home} is {host.dirs.get(home)} (not its uid's)")
        if home is not None and host.dirs.get(home / "lost+found", (None,))[0] == 0:
            problems.append(f"{account}: root's lost+found is in its home")
    home_of = {homes[a]: a for a in accounts if a in homes}
    for mount in storage.mounts:
        inside = HOME_ROOT in mount.target.parents or enforcer.images_dir in [mount.target, *mount.target.parents]
        if inside and mount.target not in home_of:
            problems.append(f"mount of {storage.back_file(mount.loop)} on {mount.target} (no live sliver's home)")
    for name, device in sorted(storage.loops.items()):
        if not any(device.volume is storage.volume(image) for image in live_images):
            problems.append(f"loop device {name} of {storage.back_file(device)} remains")
    for path in sorted(p for p in host.files if p.parent == enforcer.images_dir):
        if path not in live_images:
            problems.append(f"image file {path} of no live sliver remains")
    return problems


def check_files(world: World, node: Node, live: set[str]) -> list[str]:
    """What live slivers wrote is still there, theirs (a home carried onto an image included)."""
    problems = []
    for path, (name, data) in sorted(world.expect.items()):
        entry = world.host.users.get(PREFIX + name)
        if name not in live or entry is None:
            continue
        found = world.host.files.get(path)
        if found is None or found.data != data:
            problems.append(f"{path}, written by live sliver {name}, is {'gone' if found is None else 'changed'}")
        elif found.uid != entry.uid:
            problems.append(f"{path}, written by live sliver {name}, is now uid {found.uid}'s")
    return problems


def check_leftovers(world: World, node: Node, live: set[str]) -> list[str]:
    """Keys files, homes, files in the shared directories and spools, SysV IPC objects: none of
    a sliver that is gone."""
    host = world.host
    accounts = {PREFIX + name for name in live}
    live_uids = {host.users[a].uid for a in accounts if a in host.users}
    foreign_uids = set(world.foreign.get("uids", ()))
    foreign_accounts = set(world.foreign.get("accounts", ()))
    keys_dir = Path(node.config.slivers.keys_dir)
    problems = [f"keys file {p} of no live sliver remains" for p in sorted(host.files)
                if p.parent == keys_dir and p.name not in accounts]
    for home in sorted(d for d in host.dirs if d.parent == HOME_ROOT):
        if home.name not in accounts | foreign_accounts | set(world.foreign.get("homes", ())):
            problems.append(f"home {home} of no live sliver remains")
    gone = lambda uid: _uid_is_ours(uid) and uid not in live_uids and uid not in foreign_uids  # noqa: E731
    tops = tuple(f"{top}/" for top in [*SHARED_DIRS, *SPOOL_DIRS])
    owners = [(p, f.uid) for p, f in host.files.items()] + [(p, d[0]) for p, d in host.dirs.items()]
    problems += [f"{path} of uid {uid} (no live sliver) remains" for path, uid in sorted(owners)
                 if gone(uid) and str(path).startswith(tops)]
    problems += [f"SysV {o.kind} {o.ident} of uid {o.uid} (no live sliver) remains"
                 for o in host.ipc.objects.values() if gone(o.uid) or gone(o.cuid)]
    return problems


def check_converged(world: World, node: Node, live: set[str]) -> list[str]:
    """Another full enforcement pass changes nothing (the enforcers diff against the kernel)."""
    loop = node.enforcement_loop
    if loop is None:
        return []
    before = len(world.host.effects)
    loop.apply_now()
    changes = world.host.effects[before:]
    return [f"a further enforcement pass still changes the machine: {changes[:6]}"] if changes else []


#: In order: the last one runs a pass of its own.
KERNEL_CHECKS: list[Check] = [check_model, check_cgroups, check_bandwidth, check_disk, check_files,
                              check_leftovers, check_converged]
