"""The simulated machine is one on which everything enforcement does works, and the crash points
are exactly the changes: what the crash simulation concludes rests on both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nodemanager.testing.kernel import LAYOUTS

from .harness import Run, boot, kill, make_world
from .scenarios import scenarios
from .simhost import QUERIES, SimHost, _is_query


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_enforcer_is_available_on_the_simulated_machine(layout: str) -> None:
    scenario = next(s for s in scenarios(2, 0, layout) if s.name == "disk-quota")
    world = make_world(scenario)
    try:
        node = boot(world)
        try:
            assert node.enforcement is not None and node.enforcement.problems() == []
            assert set(node.enforcement.describe()) == {"cpu", "cpuset", "memory", "pids", "bandwidth", "disk", "placement"}
            run = Run(world, node)
            for step in scenario.steps:
                step(run)
            assert node.enforcement.problems() == [] and world.host.unmodelled == []
        finally:
            kill(node)
    finally:
        shutil.rmtree(world.base, ignore_errors=True)


def digest(host: SimHost) -> tuple[object, ...]:
    """Everything of the machine a command could change."""
    storage, net = host.storage, host.net
    return (
        sorted((str(p), f) for p, f in host.files.items()), sorted((str(p), d) for p, d in host.dirs.items()),
        sorted(host.processes.items()), sorted((str(g), sorted(p)) for g, p in host.members.items()),
        sorted((str(p), v.size, v.fs_size) for p, v in storage.volumes.items()),
        sorted((n, lp.capacity) for n, lp in storage.loops.items()), [str(m.target) for m in storage.mounts],
        repr(net.devices), repr(net.tables), repr(host.ipc.objects), sorted(host.users), sorted(host.groups),
    )


@pytest.mark.parametrize("name", ["destroy", "strays", "configure"])
def test_commands_taken_for_queries_change_nothing(name: str) -> None:
    """Every command the node ran in a scenario that SimHost does not count as an effect (so never
    crashes at) leaves the machine as it was when run again at the end."""
    scenario = next(s for s in scenarios(2, 0) if s.name == name)
    world = make_world(scenario)
    try:
        node = boot(world)
        try:
            run = Run(world, node)
            for step in scenario.steps:
                step(run)
        finally:
            kill(node)
        host = world.host
        named = [(Path(c[0]).name, *c[1:]) for c in host.commands]
        queries = {c for c in named if any(c[: len(q)] == q for q in QUERIES) or _is_query(c)}
        assert len(queries) > 10
        for argv in sorted(queries):
            before = digest(host)
            host.run(list(argv), check=False)
            assert digest(host) == before, argv
    finally:
        shutil.rmtree(world.base, ignore_errors=True)


def test_a_command_the_model_does_not_know_breaks_the_invariants() -> None:
    from .invariants import check_invariants

    scenario = next(s for s in scenarios(1, 0) if s.name == "create")
    world = make_world(scenario)
    try:
        world.host.run(["tc", "filter", "add", "dev", "eth0", "protocol", "ip"], check=False)
        node = boot(world)
        try:
            problems = check_invariants(world, node, [])
        finally:
            kill(node)
        assert any("does not know: tc filter add" in p for p in problems)
    finally:
        shutil.rmtree(world.base, ignore_errors=True)


@pytest.mark.parametrize(("scenario", "broken", "found"), [
    ("strays", "nodemanager.enforce.set.EnforcementSet.sweep", "cgroup /cg/cpu/nodemanager/simsite_stray of no live"),
    ("destroy", "nodemanager.backends.account.remove_leftovers", "/tmp/scratch-site_s2 of uid 200012"),
    ("disk-quota", "nodemanager.enforce.disk.DiskEnforcer._carry_over", "written by live sliver site_s0, is gone"),
    ("destroy", "nodemanager.enforce.set.EnforcementSet.place_processes", "is in /cg/cpu, not /cg/cpu/nodemanager"),
])
def test_the_invariants_catch_a_broken_product(scenario: str, broken: str, found: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With one piece of the product disabled, the simulation reports what it leaves undone."""
    from .harness import explore
    from .invariants import check_invariants

    monkeypatch.setattr(broken, lambda *args, **kwargs: [] if "carry" in broken else None)
    result = explore(next(s for s in scenarios(2, 0) if s.name == scenario), check_invariants, stride=50,
                     processes=1)
    assert any(found in failure for failure in result.failures), result.failures[:5]
