"""The lease schedule applied (``leasing``): persisted by the document handler, boundaries acted on
from the store with a manual clock over the cgroupfs model, logins locked, stops of frozen slivers,
the start-up thaw, the enforcement adjustment, the thread and clock steps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from nodemanager.core.leases import LEASE_CPU_FACTOR
from nodemanager.core.records import AccountState, AuthorityDocument, Phase
from nodemanager.datadir import Meta
from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.set import EnforcementSet
from nodemanager.enforce.tasks import stop_sliver
from nodemanager.enforcing import effective_targets
from nodemanager.leasing import CgroupFreezer, LeaseHandler, LeaseScheduler, load_schedule
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.fakeauthority import make_sliver
from nodemanager.testing.kernel import V1, CgroupHost

T0 = 1_700_002_800  # a whole hour
PREFIX = "nm"
UIDS = {"site_a": 200001, "site_b": 200002, "site_sys": 200003}


def document(*leases: tuple[str, int, int], policy: str = "lease_or_shared", timestamp: int = 1) -> AuthorityDocument:
    members = {"reservation_policy": policy, "lease_granularity": 60,
               "leases": [{"slice_id": 1, "name": n, "t_from": f, "t_until": u} for n, f, u in leases]}
    return AuthorityDocument(timestamp=timestamp, node_id=1, members=members)


class RecordingLogins:
    def __init__(self) -> None:
        self.open: dict[str, bool] = {}

    def set_open(self, name: str, open_: bool) -> None:
        self.open[name] = open_


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = Store(tmp_path / "s.sqlite")
    store.open()
    store.apply_records([make_sliver("site_a"), make_sliver("site_b", attributes=[("nm_enabled", "0")]),
                         make_sliver("site_sys", attributes=[("system", "1")])], [])
    for name, uid in UIDS.items():
        store.put_account(AccountState(name=name, uid=uid, owned=True, phase=Phase.RUNNING))
    host = CgroupHost(V1, cgroup_kill=False)
    tree = CgroupTree(host, ["cpu", "memory", "pids", "freezer"], group="nm")
    tree.ensure_parents()
    pids = {}
    for name, uid in UIDS.items():
        tree.ensure(PREFIX + name)
        pids[name] = host.add_process(uid)
        for group in tree.dirs(PREFIX + name):
            host.join(pids[name], group)
    enforcement = EnforcementSet([], tree=tree)
    clock = ManualClock(T0 - 10)
    logins = RecordingLogins()
    pokes: list[str | None] = []
    scheduler = LeaseScheduler(store, clock, freezer=CgroupFreezer(enforcement), logins=logins,
                               account_of=lambda n: PREFIX + n, on_lease_change=lambda: pokes.append(scheduler.holder))
    handler = LeaseHandler(store, on_change=scheduler.poke)
    yield store, host, tree, clock, scheduler, handler, logins, pids, pokes, enforcement
    store.close()


def frozen(host: CgroupHost, tree: CgroupTree, name: str) -> bool:
    return host.is_frozen(tree.parent(V1[3]) / (PREFIX + name))


def test_the_handler_persists_the_schedule_and_refuses_overlaps(node) -> None:  # type: ignore[no-untyped-def]
    store, *_ , scheduler, handler, _, _, _, _ = node
    handler.apply(document(("site_a", T0, T0 + 600), ("site_b", T0 + 300, T0 + 900), ("site_a", T0 + 900, T0 + 1200)))
    schedule = load_schedule(store)
    assert [(l.name, l.t_from) for l in schedule.leases] == [("site_a", T0 + 900)]
    assert len(schedule.refused) == 2 and all("overlaps" in r.reason for r in schedule.refused)
    assert store.get_meta(Meta.LEASES).startswith("{")


def test_boundaries_freeze_and_thaw_with_the_same_processes(node) -> None:  # type: ignore[no-untyped-def]
    store, host, tree, clock, scheduler, handler, logins, pids, pokes, _ = node
    handler.apply(document(("site_a", T0, T0 + 600)))
    assert scheduler.tick() == pytest.approx(10)  # seconds to t_from
    assert not any(frozen(host, tree, n) for n in UIDS)  # lease_or_shared: all run outside leases
    clock.advance(10)
    scheduler.tick()
    assert scheduler.holder == "site_a" and pokes == ["site_a"]
    assert frozen(host, tree, "site_b") and not frozen(host, tree, "site_a") and not frozen(host, tree, "site_sys")
    assert logins.open == {"site_b": False}
    assert scheduler.is_frozen("site_b") and not scheduler.is_frozen("site_a") and not scheduler.is_frozen("site_sys")
    clock.advance(600)
    scheduler.tick()
    assert not frozen(host, tree, "site_b") and scheduler.holder is None and pokes == ["site_a", None]
    assert logins.open == {"site_b": False}  # site_b is disabled (nm_enabled = 0): it stays locked
    assert all(pid in host.processes for pid in pids.values())  # never killed


def test_lease_or_idle_freezes_outside_leases_and_a_vanished_lease_ends_at_once(node) -> None:  # type: ignore[no-untyped-def]
    store, host, tree, clock, scheduler, handler, logins, pids, pokes, _ = node
    handler.apply(document(("site_a", T0 - 60, T0 + 600), policy="lease_or_idle"))
    scheduler.tick()
    assert scheduler.holder == "site_a" and frozen(host, tree, "site_b")
    handler.apply(document(policy="lease_or_idle", timestamp=2))  # the lease is gone
    scheduler.tick()
    assert scheduler.holder is None
    assert frozen(host, tree, "site_a") and frozen(host, tree, "site_b") and not frozen(host, tree, "site_sys")
    handler.apply(document(policy="none", timestamp=3))
    scheduler.tick()
    assert not any(frozen(host, tree, n) for n in UIDS)
    assert logins.open == {"site_a": True, "site_b": False}


def test_stop_of_a_frozen_sliver_ends_its_processes_and_the_later_thaw_is_harmless(node) -> None:  # type: ignore[no-untyped-def]
    store, host, tree, clock, scheduler, handler, logins, pids, pokes, _ = node
    handler.apply(document(("site_a", T0 - 60, T0 + 60)))
    scheduler.tick()
    assert frozen(host, tree, "site_b")
    stop_sliver(tree, PREFIX + "site_b", UIDS["site_b"], grace=0.05)
    assert pids["site_b"] not in host.processes
    scheduler.tick()  # within the lease: the scheduler does not fight the stop's thaw
    clock.advance(120)
    scheduler.tick()
    assert not frozen(host, tree, "site_b") and "site_b" not in scheduler.frozen


def test_the_start_up_thaw_keeps_what_the_schedule_freezes(node) -> None:  # type: ignore[no-untyped-def]
    store, host, tree, clock, scheduler, handler, logins, pids, pokes, enforcement = node
    handler.apply(document(("site_a", T0 - 60, T0 + 60)))
    scheduler.tick()
    tree.freeze(PREFIX + "site_a", 0.1)  # a stop of site_a cut short by a crash
    fresh = LeaseScheduler(store, clock, freezer=CgroupFreezer(enforcement), account_of=lambda n: PREFIX + n)
    thawed = enforcement.thaw_stops_cut_short(keep={PREFIX + n for n in fresh.wanted_frozen()})
    assert thawed == [PREFIX + "site_a"] and frozen(host, tree, "site_b")


def test_the_leased_sliver_gets_the_node_in_effective_targets(node) -> None:  # type: ignore[no-untyped-def]
    store, *_ = node
    plain, _ = effective_targets(store, 10_000)
    leased, _ = effective_targets(store, 10_000, "site_a")
    assert leased["site_a"]["nm_cpu_share"] == LEASE_CPU_FACTOR * 2 and leased["site_a"]["nm_net_max_rate"] == 10_000
    assert leased["site_b"] == plain["site_b"]


def test_no_freezer_no_logins_hollow_does_not_crash(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.open()
    store.apply_records([make_sliver("site_a"), make_sliver("site_b")], [])
    for name in ("site_a", "site_b"):
        store.put_account(AccountState(name=name, uid=UIDS[name], owned=True, phase=Phase.RUNNING))
    clock = ManualClock(T0)
    scheduler = LeaseScheduler(store, clock)
    LeaseHandler(store, scheduler.poke).apply(document(("site_a", T0, T0 + 60)))
    assert scheduler.tick() == 60 and scheduler.holder == "site_a" and scheduler.frozen == set()
    store.close()


def test_the_thread_hits_a_boundary_within_a_second_and_sees_a_clock_step(node) -> None:  # type: ignore[no-untyped-def]
    store, host, tree, clock, scheduler, handler, logins, pids, pokes, _ = node

    class SteppingClock:
        offset = 0.0

        def now(self) -> float:
            return time.time() + self.offset

        def monotonic(self) -> float:
            return time.monotonic()

    real = SteppingClock()
    threaded = LeaseScheduler(store, real, freezer=scheduler.freezer, account_of=lambda n: PREFIX + n)
    t_from = 60 * ((int(time.time()) + 62) // 60)  # a whole minute, a minute or two away
    LeaseHandler(store, threaded.poke).apply(document(("site_a", t_from, 10**10)))
    threaded.start()
    try:
        begin = threading.Event()
        real.offset = t_from - time.time() - 0.3  # a clock step to just before the lease
        deadline = time.monotonic() + 3
        while not frozen(host, tree, "site_b") and time.monotonic() < deadline:
            begin.wait(0.05)
        assert frozen(host, tree, "site_b")
        assert threaded.steps >= 1
        assert real.now() - t_from < 1.0  # frozen within a second of t_from
    finally:
        threaded.stop()


def test_status_and_metrics_show_the_current_and_next_lease(node) -> None:  # type: ignore[no-untyped-def]
    from nodemanager.metrics import NodeMetrics
    from nodemanager.status import render_status

    store, host, tree, clock, scheduler, handler, logins, pids, pokes, _ = node
    handler.apply(document(("site_a", T0, T0 + 600), ("site_b", T0 + 600, T0 + 1200),
                           ("site_b", T0 + 3000, T0 + 3600), ("site_a", T0 + 3300, T0 + 3900)))
    text = render_status(store, now=T0 + 10)
    assert "policy lease_or_shared, granularity 60 s, 2 accepted, 2 refused" in text
    assert "current:      site_a until" in text and "next:         site_b from" in text
    assert "frozen now:   site_b" in text and text.count("REFUSED:") == 2 and "overlaps the lease" in text
    scrape = NodeMetrics(store=store, now=lambda: T0 + 10).render().decode()
    assert 'nodemanager_lease_active{slice="site_a"} 1.0' in scrape
    assert "nodemanager_lease_next_boundary_seconds 590.0" in scrape
    assert "nodemanager_leases_refused 2.0" in scrape
    handler.apply(document(policy="none", timestamp=2))
    assert "leases:" not in render_status(store, now=T0 + 10)
    assert "nodemanager_lease_active{" not in NodeMetrics(store=store).render().decode()


def test_through_build_node_the_hollow_node_keeps_the_schedule_of_a_file_document(tmp_path: Path) -> None:
    import json

    from nodemanager.config import parse_config
    from nodemanager.daemon import build_node
    from nodemanager.status import render_status

    document, now = tmp_path / "slivers.json", int(time.time())
    (tmp_path / "node_id").write_text("1\n")
    document.write_text(json.dumps({
        "timestamp": now, "node_id": 1, "slivers": [], "reservation_policy": "lease_or_idle", "lease_granularity": 60,
        "leases": [{"slice_id": 7, "name": "site_a", "t_from": now - 120, "t_until": now + 3600}]}))
    config = parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"url": f"file://{document}", "node_id_file": str(tmp_path / "node_id"), "poll_jitter": 0},
        "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""}, "slivers": {"backend": "hollow"},
    })
    node = build_node(config)
    node.start(serve=False)
    try:
        assert node.sync_once().ok
        assert node.leases is not None and node.leases.tick() is not None and node.leases.holder == "site_a"
        assert "current:      site_a until" in render_status(node.store)
    finally:
        node.close()


def test_on_thawed_names_the_released_slivers_after_their_logins_are_unlocked(node) -> None:  # type: ignore[no-untyped-def]
    store, host, tree, clock, scheduler, handler, logins, pids, pokes, _ = node
    calls: list[tuple[frozenset[str], dict[str, bool], bool]] = []
    scheduler.on_thawed = lambda names: calls.append((names, dict(logins.open), any(frozen(host, tree, n) for n in names)))
    handler.apply(document(("site_a", T0, T0 + 600), policy="lease_or_idle"))
    scheduler.tick()  # idle: site_a and site_b frozen and locked
    assert calls == [] and frozen(host, tree, "site_a")
    clock.advance(10)
    scheduler.tick()  # site_a's lease: it is thawed and unlocked, then handed on
    assert calls == [(frozenset({"site_a"}), {"site_a": True, "site_b": False}, False)]
    scheduler.tick()  # no change, no call
    assert len(calls) == 1
    scheduler.on_thawed = lambda names: 1 / 0  # a failing hook is logged, the schedule goes on
    clock.advance(600)
    scheduler.tick()
    assert frozen(host, tree, "site_a") and scheduler.holder is None


def test_a_sliver_created_while_frozen_is_started_once_its_lease_thaws_it(tmp_path: Path) -> None:
    """Under ``lease_or_idle`` a new sliver is created frozen: its start is deferred (not done:
    its account is locked, its group frozen), recorded as ``start_pending``, and done by its
    worker as soon as the scheduler thaws it (``on_thawed``, wired as the daemon wires it)."""
    from nodemanager.backends.hollow import HollowBackend
    from nodemanager.daemon import _start_deferred
    from nodemanager.operations import SliverOperations
    from nodemanager.workers import WorkerPool

    store = Store(tmp_path / "s.sqlite")
    store.open()
    clock = ManualClock(T0 - 10)
    backend = HollowBackend()
    pool = WorkerPool(2)
    logins = RecordingLogins()

    class GrouplessFreezer:  # a sliver never started has no group to freeze
        def freeze(self, account: str) -> bool:
            return False

        def thaw(self, account: str) -> None:
            pass

    box: list[SliverOperations] = []
    scheduler = LeaseScheduler(store, clock, freezer=GrouplessFreezer(), logins=logins,
                               on_thawed=lambda names: _start_deferred(store, pool, box[0], names))
    ops = SliverOperations(store, backend, clock, lease_frozen=scheduler.is_frozen)
    box.append(ops)
    try:
        LeaseHandler(store, scheduler.poke).apply(document(("site_new", T0, T0 + 600), policy="lease_or_idle"))
        record = make_sliver("site_new")
        store.apply_records([record], [])
        ops.ensure(record, start=True)
        state = store.account("site_new")
        assert state is not None and state.phase is Phase.STOPPED and state.start_pending
        assert backend.calls["start"] == 0
        ops.start("site_new")  # an API Start while frozen: deferred too
        assert backend.calls["start"] == 0 and store.account("site_new").start_pending  # type: ignore[union-attr]
        scheduler.tick()
        assert logins.open == {"site_new": False} and "site_new" in scheduler.locked
        clock.advance(10)
        scheduler.tick()  # the lease starts: unlocked, then its deferred start queued
        assert pool.wait_idle(5)
        state = store.account("site_new")
        assert state is not None and state.phase is Phase.RUNNING and not state.start_pending
        assert backend.calls["start"] == 1 and backend.is_running("site_new")
        ops.start_deferred("site_new")  # nothing pending any more: no second start
        assert backend.calls["start"] == 1
    finally:
        pool.shutdown()
        store.close()
