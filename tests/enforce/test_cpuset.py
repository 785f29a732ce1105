"""Reserved cores on the cgroupfs model, v1, hybrid and v2: the cpuset files written, a new
sliver joinable before its first process, notes in ``problems()``, incremental passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemanager.config import Config, EnforceSection
from nodemanager.core.cores import parse_cpu_list
from nodemanager.core.errors import BackendError
from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.cpuset import CpusetEnforcer
from nodemanager.enforce.limits import CpuEnforcer
from nodemanager.enforce.report import resource_rows
from nodemanager.enforce.set import EnforcementSet
from nodemanager.testing.kernel.cgroupfs import LAYOUTS, CgroupHost

BASE = {"nm_cpu_share": 1, "nm_cpu_guaranteed_share": 0, "nm_memory_max": 0, "nm_pids_max": 1024,
        "nm_cpu_cores": 0, "nm_cpu_cores_besteffort": 0}


def rspecs(**cores: str) -> dict[str, dict[str, int]]:
    """``rspecs(a="1", b="", c="2b")``: slivers acct_a.. with their cpu_cores."""
    return {f"acct_{n}": {**BASE, "nm_cpu_cores": int(v.rstrip("b") or 0), "nm_cpu_cores_besteffort": int(v.endswith("b"))}
            for n, v in cores.items()}


def make(layout: str, cpus: int = 4) -> tuple[CgroupHost, CgroupTree, EnforcementSet]:
    host = CgroupHost(LAYOUTS[layout], cpus=cpus)
    tree = CgroupTree(host, ["cpu", "cpuset", "pids", "freezer"], group="nm")
    enforcement = EnforcementSet([], tree=tree, candidates=[CpuEnforcer(tree), CpusetEnforcer(tree)])
    enforcement.probe()
    return host, tree, enforcement


def cpusets(host: CgroupHost, tree: CgroupTree) -> dict[str, str]:
    h = tree.hierarchy_for("cpuset")
    assert h is not None
    return {name: tree.read(tree.parent(h) / name / "cpuset.cpus") or "" for name in tree.children(h)}


def effective(host: CgroupHost, tree: CgroupTree) -> dict[str, tuple[int, ...]]:
    h = tree.hierarchy_for("cpuset")
    assert h is not None
    return {name: host.cpuset_of(tree.parent(h) / name) for name in tree.children(h)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reserved_cores_are_exclusive(layout: str) -> None:
    host, tree, enforcement = make(layout)
    enforcement.apply_all(rspecs(a="1", b="", c="2b", d=""), {})
    assert cpusets(host, tree) == {"acct_a": "3", "acct_b": "0", "acct_c": "0-2", "acct_d": "0"}
    assert effective(host, tree)["acct_c"] == (0, 1, 2)
    assert enforcement.problems() == []
    assert enforcement.describe()["cpuset"].startswith(f"cgroup v{tree.hierarchy_for('cpuset').version}")  # type: ignore[union-attr]
    observed = enforcement.observed()
    assert {n: v["nm_cpu_cores"] for n, v in observed.items()} == {"acct_a": 1, "acct_b": 0, "acct_c": 2, "acct_d": 0}
    assert observed["acct_c"]["cpuset_cpus"] == 3


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_requests_beyond_the_node_are_scaled_with_a_note_in_status(layout: str) -> None:
    host, tree, enforcement = make(layout, cpus=2)
    enforcement.apply_all(rspecs(a="1", b="3", c=""), {})
    assert cpusets(host, tree) == {"acct_a": "1", "acct_b": "0", "acct_c": "0"}
    assert enforcement.problems() == [
        "sliver acct_b: cpu_cores 3 scaled to 0: the node has 2 CPUs, keeps at least 1 for the shared pool "
        "and 1 is reserved by other slivers; it runs on the shared pool"]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_new_sliver_can_take_processes_at_once_and_never_on_a_reserved_core(layout: str) -> None:
    host, tree, enforcement = make(layout)
    enforcement.apply_all(rspecs(a="2"), {})
    enforcement.prepare_sliver("acct_n", 1234, {**BASE, "nm_cpu_cores": 1})
    assert cpusets(host, tree)["acct_n"] == "0-1"  # the shared pool; its own core comes with the pass
    host.spawn_detached(["sleep", "60"], uid=1234, gid=1234, home=Path("/home/n"), env={},
                        log_path=Path("/home/n/log"), cgroups=tree.dirs("acct_n"))
    assert host.spawned[-1].pid in tree.members_of("acct_n")
    called = enforcement.apply_changes({**rspecs(a="2"), "acct_n": {**BASE, "nm_cpu_cores": 1}}, {})
    assert called.get("cpuset") == "some"
    assert cpusets(host, tree) == {"acct_a": "2-3", "acct_n": "1"}


def test_a_v1_cpuset_group_without_cpus_refuses_tasks_as_the_kernel_does() -> None:
    host = CgroupHost(LAYOUTS["v1"])
    group = Path("/cg/cpuset/bare")
    host.makedirs_owned(group, 0, 0, 0o755)
    pid = host.add_process(1001)
    with pytest.raises(BackendError, match="No space left"):
        host.write_text(group / "cgroup.procs", str(pid))
    with pytest.raises(BackendError, match="Invalid argument"):
        host.write_text(group / "cpuset.cpus", "0-9")  # beyond the parent's CPUs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_change_on_one_sliver_moves_the_shared_pool_of_all(layout: str) -> None:
    host, tree, enforcement = make(layout)
    enforcement.apply_all(rspecs(a="", b="", c=""), {})
    assert set(cpusets(host, tree).values()) == {"0-3"}
    host.calls.clear()
    called = enforcement.apply_changes(rspecs(a="", b="2", c=""), {})
    assert called == {"cpuset": "some"}
    assert cpusets(host, tree) == {"acct_a": "0-1", "acct_b": "2-3", "acct_c": "0-1"}
    assert_no_core_reaches_a_holder_too_early(host, enforcement, {"acct_a": "0-3", "acct_b": "0-3", "acct_c": "0-3"})
    # b goes: the others get its cores back
    host.calls.clear()
    assert enforcement.apply_changes(rspecs(a="", c=""), {})["cpuset"] == "some"
    assert cpusets(host, tree)["acct_a"] == "0-3"
    # nothing changed: nothing called
    assert enforcement.apply_changes(rspecs(a="", c=""), {}) == {}


def assert_no_core_reaches_a_holder_too_early(host: CgroupHost, enforcement: EnforcementSet,
                                             before: dict[str, str]) -> None:
    """Replay the pass's ``cpuset.cpus`` writes from ``before``: a sliver never gains a core
    another sliver still holds when that core is now reserved."""
    allocation = next(e for e in enforcement.enforcers if isinstance(e, CpusetEnforcer)).allocation
    assert allocation is not None
    reserved = {c for cores in allocation.reserved.values() for c in cores}
    state = {n: set(parse_cpu_list(v)) for n, v in before.items()}
    for call in host.method_calls("write_text"):
        name, cpus = call[1].parent.name, set(parse_cpu_list(call[2]))
        if call[1].name != "cpuset.cpus" or name not in state:
            continue
        gained = (cpus - state[name]) & reserved
        assert not any(gained & state[other] for other in state if other != name), (name, cpus, state)
        state[name] = cpus


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_core_moving_between_slivers_is_taken_before_it_is_given(layout: str) -> None:
    host, tree, enforcement = make(layout, cpus=2)
    enforcement.apply_all(rspecs(a="", b="1"), {})
    assert cpusets(host, tree) == {"acct_a": "0", "acct_b": "1"}
    host.calls.clear()
    enforcement.apply_changes(rspecs(a="1", b=""), {})
    assert cpusets(host, tree) == {"acct_a": "1", "acct_b": "0"}
    assert_no_core_reaches_a_holder_too_early(host, enforcement, {"acct_a": "0", "acct_b": "1"})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_grants_survive_a_restart_and_others_arriving(layout: str) -> None:
    host, tree, enforcement = make(layout)
    enforcement.apply_all(rspecs(b="1", c=""), {})
    assert cpusets(host, tree)["acct_b"] == "3"
    # a new enforcer (daemon restart) reads b's core from the kernel; a sorts first but b keeps 3
    fresh = CpusetEnforcer(tree)
    fresh.apply(rspecs(a="1", b="1", c=""), {})
    assert cpusets(host, tree) == {"acct_a": "2", "acct_b": "3", "acct_c": "0-1"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_removal_frees_the_cores(layout: str) -> None:
    host, tree, enforcement = make(layout)
    enforcement.apply_all(rspecs(a="1", b=""), {})
    enforcement.remove_all("acct_a", 1001)
    enforcement.apply_changes(rspecs(b=""), {})
    assert cpusets(host, tree) == {"acct_b": "0-3"}


def test_cpuset_comes_with_enforce_cpu_and_is_reported_when_missing() -> None:
    host = CgroupHost([h for h in LAYOUTS["v1"] if "cpuset" not in h.controllers])
    enforcement = EnforcementSet.from_config(Config(enforce=EnforceSection(bandwidth=False, disk=False)), host)
    enforcement.probe()
    assert [p for p in enforcement.problems() if p.startswith("cpuset")] == [
        "cpuset: no cgroup hierarchy offers the cpuset controller (mounted: /cg/cpu (v1: cpu), /cg/memory "
        "(v1: memory), /cg/pids (v1: pids), /cg/freezer (v1: freezer))"]
    with_cpuset = EnforcementSet.from_config(Config(enforce=EnforceSection(bandwidth=False, disk=False)),
                                             CgroupHost(LAYOUTS["v1"]))
    with_cpuset.probe()
    assert "cpuset" in with_cpuset.describe()
    without_cpu = EnforcementSet.from_config(Config(enforce=EnforceSection(cpu=False, bandwidth=False, disk=False)),
                                             CgroupHost(LAYOUTS["v1"]))
    without_cpu.probe()
    assert "cpuset" not in without_cpu.describe()


def test_status_resources_shows_the_cores_beside_the_rspec() -> None:
    host, tree, enforcement = make("hybrid", cpus=2)
    effective = rspecs(a="1", b="3", c="")
    enforcement.apply_all(effective, {})
    rows = [r for r in resource_rows(effective, enforcement.observed()) if r[1] == "nm_cpu_cores"]
    assert rows == [["acct_a", "nm_cpu_cores", "1", "1 (cpuset cpus 1)", "ok"],
                    ["acct_b", "nm_cpu_cores", "3", "0 (cpuset cpus 1)", "ok"],
                    ["acct_c", "nm_cpu_cores", "0", "0 (cpuset cpus 1)", "ok"]]
