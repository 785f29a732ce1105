"""The scenarios the crash simulation explores (issue 11): each a short life of a node.

Every scenario starts from an empty node on a fresh world and uses only what a real node sees:
authority documents, API calls, enforcement passes, the clock, and changes made behind the node's
back. Slice ids are explicit (uids derive from them). ``scenarios(size)`` scales the number of
slivers: the short profile of ``make test`` uses size 1-2, ``make crash`` larger ones and several
seeds.
"""

from __future__ import annotations

import random
from dataclasses import replace

from nodemanager.core.records import DELEGATED, NM_CONTROLLER, Sliver
from nodemanager.testing.fakeauthority import make_sliver

from .harness import HOME_ROOT, PREFIX, UID_BASE, Run, Scenario, World
from .outside import seed_strays, sliver_ignores_term, sliver_litters, sliver_writes_home

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICrashSimKey{:022d} sim@test"


def sliver(i: int, **changes: object) -> Sliver:
    base = make_sliver(f"site_s{i}", slice_id=10 + i, keys=[KEY.format(i)], initscript="#!/bin/sh\nsleep 1000\n",
                       attributes=[("nm_cpu_share", "2"), ("nm_memory_max", "65536"), ("nm_disk_quota", "10240")])
    return replace(base, **changes)  # type: ignore[arg-type]


def publish_and_sync(slivers: list[Sliver]):  # noqa: ANN201 - a Step
    def step(run: Run) -> None:
        run.publish(slivers)
        run.sync()
        run.enforce()

    return step


def sync(run: Run) -> None:
    run.sync()
    run.enforce()


def later(run: Run) -> None:
    """Past any retry backoff (at most 45 s after a first failure)."""
    run.world.clock.advance(3600)


def seed_foreign(world: World) -> None:
    """An account the node did not make holds a sliver's name: it must never be touched."""
    host = world.host
    name = PREFIX + "site_foreign"
    entry = host.add_user(name, UID_BASE + 999, home=str(HOME_ROOT / name))
    host.dirs[HOME_ROOT / name] = (entry.uid, entry.gid, 0o700)
    host.atomic_write(HOME_ROOT / name / "data", b"theirs", uid=entry.uid, gid=entry.gid, mode=0o600)
    host.add_process(entry.uid)
    from .invariants import snapshot_foreign

    world.foreign = {"names": ["site_foreign"], "accounts": [name], "uids": [entry.uid]}
    world.foreign["snapshot"] = snapshot_foreign(world)


def scenarios(size: int = 2, seed: int = 0, layout: str = "hybrid") -> list[Scenario]:
    """Every scenario with ``size`` slivers, attribute changes drawn from ``seed``, on a
    machine of cgroup ``layout``."""
    rng = random.Random(seed)
    base = [sliver(i) for i in range(size)]
    no_quota = [replace(s, attributes=(("nm_cpu_share", "2"), ("nm_disk_quota", "0"))) for s in base]
    foreign = make_sliver("site_foreign", slice_id=999)
    changed = [replace(s, keys=(KEY.format(100 + i),), attributes=(("nm_cpu_share", str(rng.randint(1, 9))),))
               for i, s in enumerate(base)]
    controller = make_sliver("site_ctrl", slice_id=5, instantiation=NM_CONTROLLER)
    delegated = make_sliver("site_deleg", slice_id=6, instantiation=DELEGATED, controller="site_ctrl")
    result = [
        Scenario("create", [publish_and_sync(base + [foreign])], setup=seed_foreign),
        Scenario("configure", [publish_and_sync(base), publish_and_sync(changed)]),
        Scenario("start-stop", [publish_and_sync(base), sliver_ignores_term(base[0]), sliver_ignores_term(base[-1]),
                                lambda run: run.call("Stop", base[0].name),
                                lambda run: run.call("Start", base[0].name),
                                lambda run: run.call("Stop", base[-1].name)]),
        Scenario("destroy", [publish_and_sync(base + [sliver(size)]),
                             sliver_litters(sliver(size)), sliver_litters(base[0]), sliver_writes_home(sliver(size)),
                             publish_and_sync(base)]),
        Scenario("disk-quota", [publish_and_sync(no_quota), sliver_writes_home(base[0]), publish_and_sync(base)]),
        Scenario("strays", [publish_and_sync(base)], setup=seed_strays),
        Scenario("drift", [publish_and_sync(base), lambda run: run.call("Stop", base[-1].name),
                           lambda run: [_remove_behind(run, s) for s in base], sync]),
        Scenario("failures", [
            lambda run: run.world.host.fail_next("useradd"), publish_and_sync(base), later, sync,
            lambda run: run.world.host.fail_next("atomic_write"), publish_and_sync(changed), later, sync,
            lambda run: run.call("Stop", base[0].name),
            lambda run: run.world.host.fail_next("atomic_write"), publish_and_sync(base),
            lambda run: _remove_behind(run, base[0]), later, sync,
            lambda run: run.world.host.fail_next("userdel"), publish_and_sync(base[1:]), later, sync,
        ]),
        Scenario("loans", [publish_and_sync(base),
                           lambda run: run.call("SetLoans", base[0].name, [[base[-1].name, "nm_cpu_share", 1]]),
                           lambda run: run.enforce()]),
        Scenario("delegated", [publish_and_sync([controller, delegated, *base]),
                               lambda run: run.call("Create", delegated.name),
                               lambda run: run.call("Destroy", delegated.name),
                               sync,  # the authority still lists it: its record is back
                               lambda run: run.call("Create", delegated.name)]),
        Scenario("disable", [publish_and_sync(base),
                             publish_and_sync([replace(s, attributes=(("nm_enabled", "0"),)) for s in base])]),
        Scenario("expiry", [publish_and_sync([replace(base[0], expires=int(1_700_000_000 + 3600)), *base[1:]]),
                            lambda run: run.world.clock.advance(7200), sync]),
        Scenario("mass-deletion", [publish_and_sync(base + [sliver(size), sliver(size + 1)]),
                                   publish_and_sync([]),
                                   lambda run: run.sync(allow_mass_delete=True)]),
    ]
    for scenario in result:
        scenario.layout = layout
    return result


def _remove_behind(run: Run, victim: Sliver) -> None:
    """An administrator removes the sliver's account behind the node's back (not an effect of
    the node: it happens whatever the node does)."""
    host = run.world.host
    account = PREFIX + victim.name
    entry = host.users.pop(account, None)
    host.groups.pop(account, None)
    host.shadow.pop(account, None)
    if entry is not None:
        for pid in [p for p, uid in host.processes.items() if uid == entry.uid]:
            del host.processes[pid]
