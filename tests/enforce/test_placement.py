"""Placement at once against FakeHost: the connector's messages, which events place what, the
subscription and its failures, and the EnforcementSet's part (limits at creation, the map)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nodemanager.config import Config, EnforceSection
from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.placement import RECENT_S, UNAVAILABLE, PlacementListener, Target
from nodemanager.enforce.procevents import (
    PROC_CN_MCAST_LISTEN,
    PROC_EVENT_EXEC,
    PROC_EVENT_FORK,
    PROC_EVENT_UID,
    Ack,
    Fork,
    UidChange,
    ack_for,
    acknowledges,
    event_message,
    parse,
    subscription,
)
from nodemanager.enforce.set import EnforcementSet
from nodemanager.testing.fakehost import FakeHost

UID = 1234
PROCS = (Path("/cg/unified/nm/acct_a/cgroup.procs"), Path("/cg/memory/nm/acct_a/cgroup.procs"))


def uid_change(pid: int, ruid: int, euid: int | None = None) -> bytes:
    return event_message(PROC_EVENT_UID, (pid, pid, ruid, ruid if euid is None else euid))


def fork(parent: int, child: int, *, thread: bool = False) -> bytes:
    return event_message(PROC_EVENT_FORK, (parent, parent, child, parent if thread else child))


def placed(host: FakeHost) -> list[tuple[Path, str]]:
    return [(c[1], c[2]) for c in host.method_calls("write_text")]  # type: ignore[misc]


@pytest.fixture
def listener() -> PlacementListener:
    host = FakeHost()
    result = PlacementListener(host, CgroupTree(host, group="nm", hierarchies=[]))
    result.set_target(UID, Target("acct_a", PROCS))
    return result


def test_messages_round_trip() -> None:
    sub = subscription(PROC_CN_MCAST_LISTEN, 41, events=None)
    assert acknowledges(parse(ack_for(sub)), 41) and not acknowledges(parse(ack_for(sub)), 40)
    assert not acknowledges(parse(ack_for(sub, err=1)), 41)
    assert parse(ack_for(sub)) == Ack(0, 42, 0)
    assert parse(uid_change(7, 1000, 0)) == UidChange(7, 7, 1000, 0)
    assert parse(fork(7, 8)) == Fork(7, 7, 8, 8)
    assert parse(event_message(PROC_EVENT_EXEC, (7, 7, 0, 0))) is None
    assert parse(uid_change(7, 1000)[:30]) is None  # truncated
    assert len(subscription(PROC_CN_MCAST_LISTEN, 1, events=3)) == 20 + 8


def test_a_uid_change_to_a_sliver_uid_places_the_process_in_every_group(listener: PlacementListener) -> None:
    host = listener.host
    pid = host.add_process(UID)  # type: ignore[attr-defined]
    assert listener.handle(uid_change(pid, UID)) == 2
    assert placed(host) == [(PROCS[0], str(pid)), (PROCS[1], str(pid))]  # type: ignore[arg-type]
    assert listener.placed == 1


def test_other_uids_and_effective_only_changes_are_left_alone(listener: PlacementListener) -> None:
    """sshd's root monitor sets only its effective uid to the user's to read key files: it must
    not be moved into the sliver."""
    assert listener.handle(uid_change(50, 999)) == 0
    assert listener.handle(uid_change(51, 0, euid=UID)) == 0
    assert placed(listener.host) == []  # type: ignore[arg-type]


def test_forks_of_a_just_placed_process_follow_it(listener: PlacementListener) -> None:
    host = listener.host
    parent = host.add_process(UID)  # type: ignore[attr-defined]
    child, grandchild, thread = host.add_process(UID), host.add_process(UID), host.add_process(UID)  # type: ignore[attr-defined]
    listener.handle(uid_change(parent, UID))
    assert listener.handle(fork(parent, child)) == 2
    assert listener.handle(fork(child, grandchild)) == 2
    assert listener.handle(fork(parent, thread, thread=True)) == 0  # a thread moves with its process
    host.now += RECENT_S + 1  # type: ignore[attr-defined]
    assert listener.handle(fork(parent, host.add_process(UID))) == 0  # type: ignore[attr-defined]
    assert listener.handle(fork(12345, 12346)) == 0  # not ours


def test_a_process_that_exited_is_no_error(listener: PlacementListener) -> None:
    listener.host.fail_next("write_text", times=2)  # type: ignore[attr-defined]
    pid = listener.host.add_process(UID)  # type: ignore[attr-defined]
    assert listener.handle(uid_change(pid, UID)) == 0 and listener.errors == 0


def test_map_is_replaced_and_forgotten(listener: PlacementListener) -> None:
    listener.set_targets({UID + 1: Target("acct_b", PROCS)})
    assert set(listener.targets()) == {UID + 1}
    listener.forget("acct_b")
    assert listener.targets() == {}


def test_probe_and_start_report_why_events_cannot_be_used() -> None:
    host = FakeHost()
    listener = PlacementListener(host, CgroupTree(host, hierarchies=[]))
    assert listener.probe() is None
    assert host.proc_channels[-1].closed  # probing unsubscribes and closes
    host.fail_next("open_proc_events", stderr="cannot listen to process events: needs CAP_NET_ADMIN")
    assert listener.probe() == f"{UNAVAILABLE}open_proc_events: cannot listen to process events: needs CAP_NET_ADMIN"
    host.proc_events_ack = False  # e.g. a network namespace that is not the initial one
    assert not listener.start()
    assert listener.problem is not None and "does not acknowledge" in listener.problem and not listener.running


def test_the_listening_thread_places_and_survives_bad_events() -> None:
    host = FakeHost()
    listener = PlacementListener(host, CgroupTree(host, hierarchies=[]))
    listener.set_target(UID, Target("acct_a", PROCS))
    assert listener.start() and listener.running
    try:
        channel = host.proc_channels[-1]
        assert len(channel.sent) == 2  # plain subscription, acknowledged; then the filter
        pid = host.add_process(UID)
        channel.push(b"\x00" * 60)  # garbage: ignored
        channel.push(channel.LOST)  # lost events: a catch-up sweep
        channel.push(uid_change(pid, UID))
        deadline = time.monotonic() + 5
        while listener.placed < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.placed == 1 and listener.lost == 1
        assert host.method_calls("pids_by_uid")  # the catch-up sweep looked for the uid's processes
    finally:
        listener.stop()
    assert not listener.running and channel.closed


MOUNTS = """\
cgroup /cg/cpu cgroup rw,cpu 0 0
cgroup /cg/memory cgroup rw,memory 0 0
cgroup /cg/pids cgroup rw,pids 0 0
cgroup /cg/freezer cgroup rw,freezer 0 0
cgroup2 /cg/unified cgroup2 rw 0 0
"""


def built(**flags: bool) -> tuple[FakeHost, EnforcementSet]:
    host = FakeHost()
    host.add_file(Path("/proc/self/mounts"), MOUNTS.encode())
    enforcement = EnforcementSet.from_config(Config(enforce=EnforceSection(bandwidth=False, disk=False, **flags)), host)
    return host, enforcement


def test_prepare_sliver_writes_limits_before_anything_runs_and_registers_placement() -> None:
    host, enforcement = built()
    assert host.calls == []  # building touches nothing
    enforcement.probe()
    assert [e.name for e in enforcement.enforcers] == ["cpu", "memory", "pids"]
    assert enforcement.describe()["pids"] == "cgroup v1 at /cg/pids"
    assert enforcement.describe()["placement"].startswith("at once")
    host.calls.clear()
    enforcement.prepare_sliver("acct_a", UID, {"nm_cpu_share": 2, "nm_memory_max": 65536, "nm_pids_max": 256})
    written = {str(c[1]): c[2] for c in host.method_calls("write_text")}
    assert written == {
        "/cg/cpu/nodemanager/acct_a/cpu.shares": "2048",
        "/cg/memory/nodemanager/acct_a/memory.limit_in_bytes": str(64 << 20),
        "/cg/memory/nodemanager/acct_a/memory.move_charge_at_immigrate": "3",
        "/cg/pids/nodemanager/acct_a/pids.max": "256",
    }
    assert enforcement.placement is not None
    target = enforcement.placement.targets()[UID]
    assert sorted(target.procs) == sorted(d / "cgroup.procs" for d in enforcement.cgroups("acct_a"))
    assert [p.parent.parent.parent.name for p in target.procs[:2]] == ["memory", "pids"]  # limits first
    # a pass before the store knows the uid keeps the registration; a sweep without it drops it
    enforcement.update_placement({}, keep={"acct_a"})
    assert UID in enforcement.placement.targets()
    enforcement.sweep(set())
    assert enforcement.placement.targets() == {}


def test_pids_follow_the_cgroups_and_a_missing_controller_is_a_problem() -> None:
    host, enforcement = built()
    host.add_file(Path("/proc/self/mounts"), MOUNTS.replace("cgroup /cg/pids cgroup rw,pids 0 0\n", "").encode())
    enforcement.probe()
    assert [e.name for e in enforcement.enforcers] == ["cpu", "memory"]
    assert any(p.startswith("pids: no cgroup hierarchy offers the pids controller") for p in enforcement.problems())
    host, enforcement = built(cpu=False, memory=False)
    enforcement.probe()
    assert enforcement.placement is None and enforcement.tree is None
    assert any(p.startswith("pids: not enforced") for p in enforcement.problems())


def test_placement_unavailable_is_an_enforcement_problem() -> None:
    host, enforcement = built()
    host.proc_events_ack = False
    enforcement.probe()
    problems = [p for p in enforcement.problems() if p.startswith(UNAVAILABLE)]
    assert len(problems) == 1 and "does not acknowledge" in problems[0]
    assert enforcement.describe()["placement"] == "periodic sweep only"
