"""A sliver whose stop was cut short by a crash while its group was frozen is not left frozen.

On cgroup v1 (no ``cgroup.kill``), stopping a sliver whose processes ignore SIGTERM freezes its
group, sends SIGKILL and thaws the group; a frozen v1 task only dies once thawed. A daemon killed
between the freeze and the thaw left the group FROZEN: when the stop was an API call (not
recorded, the sliver still running), nothing thawed it again, and the sliver's processes -- and
every login placed into its group afterwards -- stayed frozen for ever. Nothing stops a sliver
before the workers start, so at start every group of ours still frozen is thawed.
"""

from __future__ import annotations

from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.limits import CpuEnforcer, MemoryEnforcer, PidsEnforcer
from nodemanager.enforce.set import EnforcementSet
from nodemanager.testing.kernel import V1, CgroupHost

UID = 200010


def test_groups_left_frozen_are_thawed_at_start() -> None:
    host = CgroupHost(V1, cgroup_kill=False)
    tree = CgroupTree(host, ["cpu", "memory", "pids", "freezer"], group="nm")
    tree.ensure_parents()
    tree.ensure("nmsite_a")
    tree.ensure("nmsite_b")
    stubborn = host.add_process(UID)
    other = host.add_process(UID + 1)
    for group in tree.dirs("nmsite_a"):
        host.join(stubborn, group)
    for group in tree.dirs("nmsite_b"):
        host.join(other, group)
    assert tree.freeze("nmsite_a", 0.5)  # the stop of nmsite_a ...
    host.signal_pids([stubborn], 9)
    assert stubborn in host.processes  # ... killed it while frozen, and the daemon died there

    enforcement = EnforcementSet([], candidates=[cls(tree) for cls in (CpuEnforcer, MemoryEnforcer, PidsEnforcer)],
                                 tree=tree)
    enforcement.probe()
    enforcement.thaw_stops_cut_short()
    assert not host.is_frozen(tree.parent(V1[3]) / "nmsite_a")
    assert stubborn not in host.processes and other in host.processes  # the kill took effect, nothing else
