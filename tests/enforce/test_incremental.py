"""Loans cost only the enforcement work they change; the loop coalesces pokes, sweeps with the
store's keep set, and survives any exception (FakeHost counts the work)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from nodemanager.core.errors import BackendError
from nodemanager.core.records import AccountState, Loan, Phase, Sliver
from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.changes import Targets, changed_slivers
from nodemanager.enforce.limits import CpuEnforcer, MemoryEnforcer, PidsEnforcer
from nodemanager.enforce.set import EnforcementSet
from nodemanager.enforcing import EnforcementLoop

BASE = {"nm_cpu_share": 1, "nm_cpu_guaranteed_share": 0, "nm_memory_max": 0, "nm_pids_max": 1024,
        "nm_net_min_rate": 0, "nm_net_max_rate": 8000, "nm_net_share": 1, "nm_disk_quota": 0}


class Recording:
    """A stand-in for the bandwidth or disk enforcer that counts its calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[dict[str, Mapping[str, int]]] = []
        self.fail = False

    def available(self) -> str | None:
        return None

    def apply(self, rspecs, uids, homes=None):  # type: ignore[no-untyped-def]
        self.calls.append(dict(rspecs))
        if self.fail:
            raise BackendError("tc exploded")
        return ()

    def remove(self, name: str, uid: int) -> None:
        pass

    def observed(self) -> dict[str, dict[str, int]]:
        return {}


def rspecs(**changes: dict[str, int]) -> dict[str, dict[str, int]]:
    result = {name: dict(BASE) for name in ("acct_a", "acct_b", "acct_c")}
    for name, values in changes.items():
        result[name].update(values)
    return result


def written(host) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(f"{c[1].parent.name}/{c[1].name}={c[2]}" for c in host.method_calls("write_text"))


@pytest.fixture
def setup(make_cgroup_host):  # type: ignore[no-untyped-def]
    host = make_cgroup_host("hybrid")
    tree = CgroupTree(host, ["cpu", "memory", "pids", "freezer"], group="nm")
    bandwidth, disk = Recording("bandwidth"), Recording("disk")
    enforcement = EnforcementSet([CpuEnforcer(tree), MemoryEnforcer(tree), PidsEnforcer(tree), bandwidth, disk], tree=tree)
    uids = {"acct_a": 1001, "acct_b": 1002, "acct_c": 1003}
    enforcement.apply_all(rspecs(), uids)
    host.calls.clear()
    return host, enforcement, bandwidth, disk, uids


def test_a_cpu_loan_calls_only_the_cpu_enforcer_for_the_two_slivers(setup) -> None:  # type: ignore[no-untyped-def]
    host, enforcement, bandwidth, disk, uids = setup
    called = enforcement.apply_changes(rspecs(acct_a={"nm_cpu_share": 1}, acct_b={"nm_cpu_share": 1}), uids)
    assert called == {} and host.calls == []  # nothing changed: nothing read, nothing written
    loaned = rspecs(acct_a={"nm_cpu_share": 3}, acct_b={"nm_cpu_share": 1, "nm_cpu_guaranteed_share": 0})
    called = enforcement.apply_changes(loaned, uids)
    assert called == {"cpu": "some"}
    assert written(host) == ["acct_a/cpu.shares=3072", "nm/cpu.shares=5120"]  # a's weight and the parent
    assert len(bandwidth.calls) == len(disk.calls) == 1  # only the first full pass
    assert not [c for c in host.calls if c[0] == "read_file" and "memory" in str(c[1])]


def test_a_rate_loan_calls_only_bandwidth_and_a_uid_change_bandwidth_and_disk(setup) -> None:  # type: ignore[no-untyped-def]
    host, enforcement, bandwidth, disk, uids = setup
    called = enforcement.apply_changes(rspecs(acct_a={"nm_net_min_rate": 500}), uids)
    assert called == {"bandwidth": "all"} and written(host) == []
    called = enforcement.apply_changes(rspecs(acct_a={"nm_net_min_rate": 500}), {**uids, "acct_c": 2003})
    assert called == {"bandwidth": "all", "disk": "all"}


def test_a_new_sliver_concerns_every_enforcer_and_a_failed_one_is_redone_in_full(setup) -> None:  # type: ignore[no-untyped-def]
    host, enforcement, bandwidth, disk, uids = setup
    more = {**rspecs(), "acct_d": dict(BASE, nm_memory_max=1024)}
    bandwidth.fail = True
    with pytest.raises(BackendError, match="bandwidth: tc exploded"):
        enforcement.apply_changes(more, {**uids, "acct_d": 1004})
    assert enforcement.failed == ("bandwidth",)
    assert "acct_d/memory.limit_in_bytes=1048576" in written(host)
    bandwidth.fail = False
    called = enforcement.apply_changes(more, {**uids, "acct_d": 1004})
    assert called == {"bandwidth": "all"} and enforcement.failed == ()
    enforcement.set_node_cap(20000)  # Recording has no set_node_cap: not a BandwidthEnforcer
    assert enforcement.apply_changes(more, {**uids, "acct_d": 1004}) == {}


def test_changed_slivers_per_enforcer() -> None:
    before = Targets(rspecs(), {"acct_a": 1}, {"acct_a": Path("/h/a")})
    after = Targets({**rspecs(acct_b={"nm_memory_max": 5}), "acct_x": dict(BASE)}, {"acct_a": 1},
                    {"acct_a": Path("/h/other")})
    assert changed_slivers("memory", before, after) == {"acct_b", "acct_x"}
    assert changed_slivers("cpu", before, after) == {"acct_x"}
    assert changed_slivers("disk", before, after) == {"acct_a", "acct_x"}
    assert changed_slivers("future", before, after) is None


class FakeStore:
    """What the loop reads of the store."""

    def __init__(self) -> None:
        self.states: dict[str, AccountState] = {}
        self.records: dict[str, Sliver] = {}
        self.lent: dict[str, tuple[Loan, ...]] = {}

    def add(self, name: str, uid: int | None, phase: Phase, share: int = 1) -> None:
        self.states[name] = AccountState(name, uid=uid, owned=True, phase=phase)
        self.records[name] = Sliver(name, 1, "plc-instantiated", 2**31 - 1, 1,
                                    attributes=(("nm_cpu_share", str(share)),))

    def accounts(self) -> dict[str, AccountState]:
        return dict(self.states)

    def slivers(self) -> dict[str, Sliver]:
        return dict(self.records)

    def loans(self) -> dict[str, tuple[Loan, ...]]:
        return dict(self.lent)

    def byte_budgets(self) -> dict[str, object]:
        return {}


class CountingSet:
    """An EnforcementSet stand-in recording what the loop asks of it."""

    placement = None
    failed: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.full = 0
        self.changes = 0
        self.swept: list[set[str]] = []
        self.raise_next: Exception | None = None
        self.event = threading.Event()

    def apply_all(self, rspecs, uids, homes=None) -> None:  # type: ignore[no-untyped-def]
        self.full += 1
        self.event.set()

    def apply_changes(self, rspecs, uids, homes=None):  # type: ignore[no-untyped-def]
        self.changes += 1
        self.event.set()
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        return {}

    def refresh(self, owned, is_ours):  # type: ignore[no-untyped-def]
        keep, uids = owned()
        self.swept.append({k for k in keep if is_ours(k)})
        return keep, uids

    def update_placement(self, uids, keep) -> None:  # type: ignore[no-untyped-def]
        pass

    def place_processes(self, uids) -> int:  # type: ignore[no-untyped-def]
        return 0


def loop_of(store: FakeStore, enforcement: CountingSet, errors: list[str]) -> EnforcementLoop:
    return EnforcementLoop(enforcement, store, home_of=lambda n: Path("/h") / n,  # type: ignore[arg-type]
                           node_cap_kbps=lambda: None, account_prefix="nm",
                           on_error=errors.append, place_s=0.05)


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_keep_set_is_every_owned_account_and_the_sweep_only_touches_ours() -> None:
    store, enforcement, errors = FakeStore(), CountingSet(), []
    store.add("pl_run", 1001, Phase.RUNNING)
    store.add("pl_new", None, Phase.ABSENT)  # being created: no uid yet
    store.add("pl_gone", 1003, Phase.DESTROYING)  # being destroyed
    store.states["pl_theirs"] = AccountState("pl_theirs", uid=1004, owned=False, phase=Phase.STOPPED)
    loop = loop_of(store, enforcement, errors)
    loop.apply_now()
    assert enforcement.swept == [{"nmpl_run", "nmpl_new", "nmpl_gone"}]
    assert loop.account_prefix == "nm"
    assert loop._is_ours("nmpl_x") and not loop._is_ours("pl_x") and not loop._is_ours("nmNOT-A-NAME")
    assert errors == []


def test_pokes_are_coalesced_and_exceptions_never_end_the_loop() -> None:
    store, enforcement, errors = FakeStore(), CountingSet(), []
    store.add("pl_a", 1001, Phase.RUNNING)
    loop = loop_of(store, enforcement, errors)
    loop.start()
    try:
        assert wait_until(lambda: enforcement.full == 1)
        enforcement.raise_next = RuntimeError("not a NodeManagerError")
        loop.poke()
        assert wait_until(lambda: errors == ["other"])
        assert loop._thread is not None and loop._thread.is_alive()
        before = enforcement.changes
        for _ in range(200):  # a burst: SetLoans in a loop
            loop.poke()
        assert wait_until(lambda: enforcement.changes > before)
        time.sleep(3 * loop.min_interval_s)
        assert enforcement.changes - before <= 2  # one pass per interval, not one per poke
        store.states = {}  # the store breaking mid-pass (here: a KeyError) is counted too
        store.records = None  # type: ignore[assignment]
        loop.poke()
        assert wait_until(lambda: len(errors) >= 2)
        assert loop._thread.is_alive()
    finally:
        loop.stop()
    assert loop._thread is None


def test_a_full_pass_every_reapply_s() -> None:
    store, enforcement, errors = FakeStore(), CountingSet(), []
    loop = loop_of(store, enforcement, errors)
    loop.reapply_s = 0.1
    loop.start()
    try:
        assert wait_until(lambda: enforcement.full >= 3)
    finally:
        loop.stop()


def test_a_sliver_removal_waits_for_a_pass_in_progress() -> None:
    """The enforcement loop's pass and a worker's destroy both read then write the kernel (tc
    classes, nft maps): run together, both deleted the same HTB class and the destroy failed
    with "No such file or directory". A removal now waits for the pass, and a pass for it."""
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    class Slow(Recording):
        def apply(self, rspecs, uids, homes=None):  # type: ignore[no-untyped-def]
            order.append("pass begins")
            inside.set()
            assert release.wait(5)
            order.append("pass ends")
            return ()

        def remove(self, name: str, uid: int) -> None:
            order.append(f"remove {name}")

    enforcers = EnforcementSet([Slow("bandwidth")])
    passing = threading.Thread(target=enforcers.apply_all, args=(rspecs(), {"acct_a": 1001}))
    passing.start()
    assert inside.wait(5)
    removing = threading.Thread(target=enforcers.remove_all, args=("acct_a", 1001))
    removing.start()
    removing.join(0.2)
    assert removing.is_alive(), "the removal ran while the pass was in progress"
    release.set()
    passing.join(5)
    removing.join(5)
    assert order == ["pass begins", "pass ends", "remove acct_a"]


def test_a_sweep_reads_the_keep_set_after_a_sliver_being_prepared_is_registered(make_cgroup_host) -> None:  # type: ignore[no-untyped-def]
    """The enforcement loop read the store's keep set, then swept: a sliver whose groups a
    worker made in between (its intent already in the store) was swept as a stranger, its first
    processes killed. The keep set is now read under the lock ``prepare_sliver`` holds."""
    tree = CgroupTree(make_cgroup_host("hybrid"), ["cpu", "memory", "pids", "freezer"], group="nm")
    enforcement = EnforcementSet([CpuEnforcer(tree)], tree=tree)
    store: set[str] = set()
    reading = threading.Event()
    go_on = threading.Event()

    def owned() -> tuple[set[str], dict[str, int]]:
        keep = set(store)  # read before the worker records its intent ...
        reading.set()
        assert go_on.wait(5)
        return keep, {}

    sweeping = threading.Thread(target=enforcement.refresh, args=(owned, lambda n: True))
    sweeping.start()
    assert reading.wait(5)
    store.add("nm_new")  # ... which it does now, then makes the sliver's groups
    preparing = threading.Thread(target=enforcement.prepare_sliver, args=("nm_new", 1001, BASE))
    preparing.start()
    preparing.join(0.2)
    assert preparing.is_alive(), "groups were made while a sweep with an older keep set ran"
    go_on.set()
    sweeping.join(5)
    preparing.join(5)
    assert tree.existing("nm_new")
    enforcement.refresh(lambda: (set(), {}), lambda n: True)
    assert not tree.existing("nm_new")
