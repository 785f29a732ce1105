"""The cgroup drivers against FakeHost: v1, v2 and hybrid layouts, idempotence, placement, removal."""

from __future__ import annotations

from pathlib import Path

from nodemanager.enforce.cgroups import CgroupTree, Hierarchy, parse_mounts
from nodemanager.enforce.limits import CpuEnforcer, MemoryEnforcer
from nodemanager.enforce.tasks import sweep
from nodemanager.testing.fakehost import FakeHost

V1_CPU = Hierarchy(Path("/cg/cpu"), 1, frozenset({"cpu"}))
V1_MEM = Hierarchy(Path("/cg/memory"), 1, frozenset({"memory"}))
V2_BARE = Hierarchy(Path("/cg/unified"), 2, frozenset({"hugetlb"}))
V2_FULL = Hierarchy(Path("/cg2"), 2, frozenset({"cpu", "memory", "io"}))

MOUNTS = """\
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
/dev/vda / ext4 rw 0 0
"""


def writes(host: FakeHost) -> list[tuple[Path, str]]:
    return [(c[1], c[2]) for c in host.method_calls("write_text")]  # type: ignore[misc]


def test_parse_mounts_finds_v1_controllers_and_v2() -> None:
    found = parse_mounts(MOUNTS)
    assert [(str(h.mount), h.version, sorted(h.controllers)) for h in found] == [
        ("/sys/fs/cgroup/cpu", 1, ["cpu"]), ("/sys/fs/cgroup/memory", 1, ["memory"]), ("/sys/fs/cgroup/unified", 2, [])]


def test_hybrid_uses_v1_for_controllers_and_v2_for_tracking() -> None:
    tree = CgroupTree(FakeHost(), hierarchies=[V1_CPU, V1_MEM, V2_BARE], group="nm")
    assert tree.hierarchy_for("cpu") == V1_CPU and tree.hierarchy_for("memory") == V1_MEM
    assert tree.dirs("s") == [Path("/cg/unified/nm/s"), Path("/cg/cpu/nm/s"), Path("/cg/memory/nm/s")]
    assert CgroupTree(FakeHost(), hierarchies=[V2_FULL]).dirs("s") == [Path("/cg2/nodemanager/s")]
    missing = CgroupTree(FakeHost(), hierarchies=[V2_BARE]).missing("cpu")
    assert missing is not None and "cpu controller" in missing and "/cg/unified" in missing


def test_v1_weights_and_limits_and_reapply_writes_nothing() -> None:
    host = FakeHost()
    tree = CgroupTree(host, hierarchies=[V1_CPU, V1_MEM, V2_BARE], group="nm")
    rspecs = {"a": {"nm_cpu_share": 1, "nm_memory_max": 65536}, "b": {"nm_cpu_share": 3, "nm_memory_max": 0}}
    CpuEnforcer(tree).apply(rspecs, {})
    MemoryEnforcer(tree).apply(rspecs, {})
    assert dict(writes(host)) == {
        Path("/cg/cpu/nm/a/cpu.shares"): "1024", Path("/cg/cpu/nm/b/cpu.shares"): "3072",
        Path("/cg/cpu/nm/cpu.shares"): "4096",
        Path("/cg/memory/nm/a/memory.limit_in_bytes"): str(65536 * 1024),
        Path("/cg/memory/nm/b/memory.limit_in_bytes"): "-1",
    }
    assert Path("/cg/unified/nm/a") in host.dirs
    host.calls.clear()
    host.files[Path("/cg/memory/nm/b/memory.limit_in_bytes")] = host.files[Path("/cg/memory/nm/b/memory.limit_in_bytes")].__class__(
        b"9223372036854771712\n", 0, 0, 0o644)  # what v1 reads back for "unlimited"
    CpuEnforcer(tree).apply(rspecs, {})
    MemoryEnforcer(tree).apply(rspecs, {})
    assert writes(host) == []
    assert MemoryEnforcer(tree).observed() == {"a": {"nm_memory_max": 65536}, "b": {"nm_memory_max": 0}}
    observed = CpuEnforcer(tree).observed()
    assert observed["b"]["nm_cpu_share"] == 3 and observed["b"]["cpu_weight"] == 3072


def test_v2_enables_controllers_and_writes_weights() -> None:
    host = FakeHost()
    tree = CgroupTree(host, hierarchies=[V2_FULL])
    rspecs = {"g": {"nm_cpu_share": 1, "nm_cpu_guaranteed_share": 500, "nm_memory_max": 1024}, "h": {"nm_cpu_share": 2}}
    CpuEnforcer(tree).apply(rspecs, {})
    MemoryEnforcer(tree).apply(rspecs, {})
    written = dict(writes(host))
    assert written[Path("/cg2/cgroup.subtree_control")] == "+cpu +memory"
    assert written[Path("/cg2/nodemanager/cgroup.subtree_control")] == "+cpu +memory"
    assert written[Path("/cg2/nodemanager/h/cpu.weight")] == "200"
    assert int(written[Path("/cg2/nodemanager/g/cpu.weight")]) * 1000 >= 500 * (100 + 200 + int(written[Path("/cg2/nodemanager/g/cpu.weight")]))
    assert written[Path("/cg2/nodemanager/g/memory.max")] == str(1024 * 1024)
    assert written[Path("/cg2/nodemanager/h/memory.max")] == "max"
    assert CpuEnforcer(tree).observed()["g"]["nm_cpu_guaranteed_share"] >= 500


def test_apply_leaves_groups_of_absent_slivers_to_the_sweep() -> None:
    host = FakeHost()
    tree = CgroupTree(host, hierarchies=[V1_CPU], controllers=("cpu",))
    CpuEnforcer(tree).apply({"a": {}, "b": {}}, {})
    CpuEnforcer(tree).apply({}, {})  # "a" may be a sliver being created: apply never removes
    assert Path("/cg/cpu/nodemanager/a") in host.dirs and Path("/cg/cpu/nodemanager/b") in host.dirs
    assert sweep(tree, {"b"}) == ["a"]
    assert Path("/cg/cpu/nodemanager/a") not in host.dirs and Path("/cg/cpu/nodemanager/b") in host.dirs


def test_place_moves_only_processes_not_already_there() -> None:
    host = FakeHost()
    tree = CgroupTree(host, hierarchies=[V1_CPU, V2_BARE], controllers=("cpu",), group="nm")
    CpuEnforcer(tree).apply({"a": {}}, {"a": 1001})
    inside, outside, foreign = host.add_process(1001), host.add_process(1001), host.add_process(0)
    host.write_text(Path(f"/proc/{inside}/cgroup"), "1:cpu:/nm/a\n0::/nm/a\n")
    host.write_text(Path(f"/proc/{outside}/cgroup"), "1:cpu:/\n0::/user.slice\n")
    host.calls.clear()
    assert tree.place({"a": 1001}) == 2
    assert sorted(writes(host)) == [(Path("/cg/cpu/nm/a/cgroup.procs"), str(outside)),
                                    (Path("/cg/unified/nm/a/cgroup.procs"), str(outside))]
    assert foreign not in [int(v) for _, v in writes(host)]


def test_kill_and_remove_kills_through_the_cgroup_then_removes() -> None:
    host = FakeHost()
    tree = CgroupTree(host, hierarchies=[V1_CPU, V2_BARE], controllers=("cpu",), group="nm")
    CpuEnforcer(tree).apply({"a": {}}, {})
    pid = host.add_process(1001)
    procs = [Path("/cg/cpu/nm/a/cgroup.procs"), Path("/cg/unified/nm/a/cgroup.procs")]
    for f in procs:
        host.write_text(f, f"{pid}\n")
    host.write_text(Path("/cg/unified/nm/a/cgroup.kill"), "")
    original_write = host.write_text

    def write_text(path: Path, text: str) -> None:
        original_write(path, text)
        if path.name == "cgroup.kill":  # the kernel empties the group
            host.processes.pop(pid, None)
            for f in procs:
                original_write(f, "")

    host.write_text = write_text  # type: ignore[method-assign]
    CpuEnforcer(tree).remove("a", 1001)
    assert (Path("/cg/unified/nm/a/cgroup.kill"), "1") in writes(host)
    assert host.method_calls("signal_pids") == []  # no racing a fork loop pid by pid
    assert not any(p.parent.name == "nm" and p.name == "a" for p in host.dirs)
    CpuEnforcer(tree).remove("a", 1001)  # idempotent

