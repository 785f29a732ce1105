"""Stop and removal through the cgroup (v1 freezer, v2 cgroup.kill, hybrid), the sweep of groups
that belong to no sliver, and signals that never reach a reused pid: against a cgroupfs-like
FakeHost with a manual clock."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nodemanager.backends.processes import stop_processes
from nodemanager.core.errors import BackendError
from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.tasks import (
    FREEZE_TIMEOUT,
    KILL_TIMEOUT,
    SETTLE_TIMEOUT,
    kill_and_remove,
    stop_sliver,
    sweep,
)
from nodemanager.testing.fakehost import FakeHost

UID = 1234


def tree_of(host) -> CgroupTree:  # type: ignore[no-untyped-def]
    tree = CgroupTree(host, ["cpu", "memory", "pids", "freezer"], group="nm")
    tree.ensure_parents()
    return tree


def started(host, tree: CgroupTree, name: str = "acct_a", count: int = 3) -> list[int]:  # type: ignore[no-untyped-def]
    """``count`` processes of UID inside the sliver's groups (as Start leaves them)."""
    tree.ensure(name)
    pids = [host.add_process(UID) for _ in range(count)]
    for pid in pids:
        for d in tree.dirs(name):
            host.join(pid, d)
    return pids


def writes(host) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(f"{c[1].parent.name}/{c[1].name}", c[2]) for c in host.method_calls("write_text")]


def test_stop_terms_everyone_then_kills_through_the_cgroup(cgroup_host) -> None:  # type: ignore[no-untyped-def]
    host = cgroup_host
    tree = tree_of(host)
    polite, stubborn = started(host, tree, count=2)
    host.ignore_term.add(stubborn)
    bystander = host.add_process(4242)
    start = host.monotonic()
    stopped = stop_sliver(tree, "acct_a", UID, grace=2.0)
    assert host.processes == {bystander: 4242}
    assert stopped.termed == 2 and stopped.kill_rounds == 1
    assert host.monotonic() - start >= 2.0  # the grace period was given
    terms = [c for c in host.method_calls("signal_pids") if c[2] == signal.SIGTERM]
    assert sorted(p for c in terms for p in c[1]) == [polite, stubborn]  # each TERMed once
    if tree.v2 is not None:  # hybrid and v2: the kernel kills the group, no pid is signalled
        assert ("acct_a/cgroup.kill", "1") in writes(host)
        assert not [c for c in host.method_calls("signal_pids") if c[2] == signal.SIGKILL]
    else:  # pure v1: freeze, SIGKILL the members, thaw
        states = [v for n, v in writes(host) if n == "acct_a/freezer.state"]
        assert states == ["FROZEN", "THAWED"]
        kills = [c for c in host.method_calls("signal_pids") if c[2] == signal.SIGKILL]
        assert [list(c[1]) for c in kills] == [[stubborn]]


def test_processes_of_the_uid_outside_the_groups_are_moved_in_and_stopped(cgroup_host) -> None:  # type: ignore[no-untyped-def]
    host = cgroup_host
    tree = tree_of(host)
    login = host.add_process(UID)  # a login the listener missed: in no sliver group
    stop_sliver(tree, "acct_a", UID, grace=0.5)
    assert login not in host.processes
    assert all(c[1].name != "cgroup.procs" or c[2] == str(login) for c in host.method_calls("write_text"))


def test_v1_freezer_that_stays_freezing_is_waited_for_a_bounded_time(make_cgroup_host) -> None:  # type: ignore[no-untyped-def]
    host = make_cgroup_host("v1")
    host.stuck_freezing = True
    tree = tree_of(host)
    (pid,) = started(host, tree, count=1)
    host.ignore_term.add(pid)
    start = host.monotonic()
    stop_sliver(tree, "acct_a", UID, grace=0)
    assert pid not in host.processes  # killed anyway, the freeze wait having timed out
    assert host.monotonic() - start < FREEZE_TIMEOUT + 1.0
    assert [v for n, v in writes(host) if n == "acct_a/freezer.state"] == ["FROZEN", "THAWED"]


def test_survivors_fail_the_stop_after_a_bounded_time(cgroup_host) -> None:  # type: ignore[no-untyped-def]
    host = cgroup_host
    tree = tree_of(host)
    (pid,) = started(host, tree, count=1)
    host.immortal.add(pid)
    start = host.monotonic()
    with pytest.raises(BackendError, match="acct_a: 1 process.*survive"):
        stop_sliver(tree, "acct_a", UID, grace=1.0)
    assert host.monotonic() - start <= 1.0 + KILL_TIMEOUT + FREEZE_TIMEOUT + 2 * SETTLE_TIMEOUT  # one round late at most
    if tree.v2 is None:  # every freeze was thawed again: the sliver is not left frozen
        states = [v for n, v in writes(host) if n == "acct_a/freezer.state"]
        assert states and states[-1] == "THAWED" and states.count("FROZEN") == states.count("THAWED")


def test_kill_and_remove_leaves_no_group_and_is_idempotent(cgroup_host) -> None:  # type: ignore[no-untyped-def]
    host = cgroup_host
    tree = tree_of(host)
    started(host, tree)
    kill_and_remove(tree, "acct_a", UID)
    assert tree.existing("acct_a") == [] and not host.processes
    kill_and_remove(tree, "acct_a", UID)


def test_sweep_empties_and_removes_only_what_belongs_to_no_sliver(cgroup_host) -> None:  # type: ignore[no-untyped-def]
    host = cgroup_host
    tree = tree_of(host)
    kept = started(host, tree, "nm_kept", count=1)
    busy = started(host, tree, "nm_gone_busy", count=2)
    tree.ensure("nm_gone_empty")
    tree.ensure("other_x")  # not named like our accounts: another node manager's
    removed = sweep(tree, {"nm_kept"}, is_ours=lambda name: name.startswith("nm_"))
    assert removed == ["nm_gone_busy", "nm_gone_empty"]
    assert all(p not in host.processes for p in busy) and all(p in host.processes for p in kept)
    for h in tree.used():
        assert sorted(tree.children(h)) == ["nm_kept", "other_x"]


def test_sweep_failure_is_logged_and_retried_later(cgroup_host, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    host = cgroup_host
    tree = tree_of(host)
    (pid,) = started(host, tree, "nm_gone", count=1)
    host.immortal.add(pid)
    assert sweep(tree, set()) == []
    assert "stray_cgroup_kept" in caplog.text
    host.immortal.clear()
    assert sweep(tree, set()) == ["nm_gone"]


def test_signals_never_reach_a_pid_reused_by_another_user() -> None:
    """The pid-based fallback: the scan saw the sliver's process, which exits; the pid is then
    reused by someone else's before the signal: the uid check (made once the pidfd is open in
    the real host) refuses it."""
    host = FakeHost()
    original = host.pids_of_uid

    def scan_then_reuse(uid: int) -> list[int]:
        pids = original(uid)
        for pid in pids:
            host.processes[pid] = 0  # exited, and the number now belongs to root's new process
        return pids

    victim = host.add_process(UID)
    host.pids_of_uid = scan_then_reuse  # type: ignore[method-assign]
    stop_processes(host, UID, grace=0)
    assert host.processes == {victim: 0}  # root's process was never signalled
    assert host.method_calls("kill")  # it was tried, and refused by the check


def test_cgroup_members_are_checked_before_a_signal(make_cgroup_host) -> None:  # type: ignore[no-untyped-def]
    host = make_cgroup_host("v1")
    tree = tree_of(host)
    (pid,) = started(host, tree, count=1)
    host.ignore_term.add(pid)
    stranger = host.add_process(0)
    checked: list[int] = []
    original = tree.is_member

    def is_member(p: int, name: str) -> bool:
        checked.append(p)
        return original(p, name)

    tree.is_member = is_member  # type: ignore[method-assign]
    stop_sliver(tree, "acct_a", UID, grace=0)
    assert pid in checked and stranger in host.processes
    assert not tree.is_member(stranger, "acct_a")


def test_tree_paths_per_layout(cgroup_host) -> None:  # type: ignore[no-untyped-def]
    tree = tree_of(cgroup_host)
    dirs = [str(d) for d in tree.dirs("s")]
    if tree.v2 is not None and "cpu" in tree.v2.controllers:
        assert dirs == ["/cg2/nm/s"]
    elif tree.v2 is not None:
        assert dirs == ["/cg/unified/nm/s", "/cg/cpu/nm/s", "/cg/memory/nm/s", "/cg/pids/nm/s", "/cg/freezer/nm/s"]
    else:
        assert dirs == ["/cg/cpu/nm/s", "/cg/memory/nm/s", "/cg/pids/nm/s", "/cg/freezer/nm/s"]
    if tree.v2 is not None and "cpu" in tree.v2.controllers:  # the parent hands our controllers down
        assert tree.read(Path("/cg2/nm/cgroup.subtree_control")) == "cpu memory pids"
        tree.ensure("s")
        assert tree.read(Path("/cg2/nm/s/cpu.weight")) == "100"  # so a child gets their files
