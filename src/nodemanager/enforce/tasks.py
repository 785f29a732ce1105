"""Ending a sliver's processes through its cgroups, and removing groups that belong to no sliver.

Why through the cgroup: a sliver that keeps forking outruns any loop that lists its processes
and signals them one by one (``pkill`` once: 89 survivors in 90 tries here). The cgroup holds
every descendant wherever it goes, so:

1. every process of the sliver's uid that is not in its groups yet is moved in (a login the
   listener missed, a program started before the groups existed);
2. everything is sent SIGTERM, once per process, and given up to ``grace`` seconds to exit;
3. then the kernel kills the group: v2 ``cgroup.kill`` (new forks included, atomically); where
   that is not available (v1-only hosts, kernels before 5.14) or leaves members behind (a
   hybrid host's v1 groups), the group is frozen (v1 ``freezer.state``, v2 ``cgroup.freeze``),
   every member is sent SIGKILL, and the group is thawed so the signals take effect. A frozen
   group cannot fork, so this never depends on outrunning a fork loop. The wait for FROZEN is
   bounded (the v1 freezer stayed FREEZING once in 30 here): on timeout the round goes on, and
   the next round tries again.

Signals go through pidfds with the target checked once it is open (a member of the sliver's
group, or a process of its uid), so a pid reused meanwhile by someone else is never hit.

The sweep (:func:`sweep`) removes the groups of accounts the store no longer knows, in every
hierarchy, killing whatever still runs in them first: what a crash between "processes killed"
and "groups removed" leaves behind, or what an older version left.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Collection

from ..core.errors import BackendError
from ..core.records import StopOutcome
from .cgroups import CgroupTree

log = logging.getLogger(__name__)

#: How often the grace period checks whether the processes are gone.
GRACE_POLL = 0.1
#: How long the kill rounds may take before the stop fails (the sliver's Stop/Destroy is then
#: retried by its worker): well within the 10 s a Destroy of a fork loop is allowed.
KILL_TIMEOUT = 8.0
#: Longest wait for a freeze to complete, and for a killed group to empty, per round.
FREEZE_TIMEOUT = 0.5
SETTLE_TIMEOUT = 0.5


def stop_sliver(tree: CgroupTree, name: str, uid: int | None, grace: float) -> StopOutcome:
    """End every process of sliver ``name`` (its groups' members and, with ``uid``, every
    process of that uid): SIGTERM, up to ``grace`` seconds, then kill through the cgroup.

    The groups are created when missing, so that stray processes of ``uid`` can be moved in
    and killed with the rest. Raises ``BackendError`` when processes survive
    :data:`KILL_TIMEOUT` seconds of kill rounds. Idempotent; one call per sliver at a time."""
    host = tree.host
    if uid is not None:
        tree.ensure(name)
    termed: set[int] = set()
    deadline = host.monotonic() + max(0.0, grace)
    while True:
        members, strays = _gather(tree, name, uid)
        if not members and not strays:
            return StopOutcome(len(termed), 0)
        _signal(tree, name, uid, members - termed, strays - termed, signal.SIGTERM)
        termed |= members | strays
        left = deadline - host.monotonic()
        if left <= 0:
            break
        host.sleep(min(GRACE_POLL, left))
    return StopOutcome(len(termed), kill_through_cgroup(tree, name, uid))


def kill_through_cgroup(tree: CgroupTree, name: str, uid: int | None, timeout: float = KILL_TIMEOUT) -> int:
    """Kill everything in the sliver's groups (and strays of ``uid``) until nothing is left;
    returns the rounds it took. Raises ``BackendError`` after ``timeout`` seconds."""
    host = tree.host
    deadline = host.monotonic() + timeout
    rounds = 0
    while True:
        members, strays = _gather(tree, name, uid)
        if not members and not strays:
            return rounds
        if host.monotonic() >= deadline:
            raise BackendError(f"sliver {name}: {len(members | strays)} process(es) survive killing "
                               f"through the cgroup for {timeout:g}s")
        rounds += 1
        if members and not (tree.kill_all(name) and _emptied(tree, name)):
            frozen = tree.freeze(name, FREEZE_TIMEOUT)
            try:
                _signal(tree, name, uid, tree.members_of(name), set(), signal.SIGKILL)
            finally:
                if frozen is not None:
                    tree.thaw(name)
            _emptied(tree, name)
        if strays:
            _signal(tree, name, uid, set(), strays, signal.SIGKILL)
            host.sleep(0.02)


def kill_and_remove(tree: CgroupTree, name: str, uid: int | None) -> None:
    """Kill every process in the sliver's groups and remove the groups. Idempotent."""
    if not tree.existing(name):
        return
    kill_through_cgroup(tree, name, uid)
    tree.remove(name)


def sweep(tree: CgroupTree, keep: Collection[str], is_ours: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Empty and remove, in every hierarchy used, the groups under our parent whose name is not
    in ``keep`` but ``is_ours`` (an account name of this node manager). Returns the names
    removed; a group that cannot be removed is logged and tried again at the next sweep."""
    candidates = sorted({child for h in tree.used() for child in tree.children(h)
                         if child not in keep and is_ours(child)})
    removed: list[str] = []
    for name in candidates:
        try:
            kill_and_remove(tree, name, None)
        except BackendError as exc:
            log.warning("event=stray_cgroup_kept sliver=%s error=%r", name, str(exc))
            continue
        log.info("event=stray_cgroup_removed sliver=%s", name)
        removed.append(name)
    return removed


def _gather(tree: CgroupTree, name: str, uid: int | None) -> tuple[set[int], set[int]]:
    """(members of the sliver's groups, processes of ``uid`` still outside them), after moving
    the uid's processes in."""
    if uid is None:
        return tree.members_of(name), set()
    tree.place({name: uid})
    members = tree.members_of(name)
    return members, set(tree.host.pids_of_uid(uid)) - members


def _signal(tree: CgroupTree, name: str, uid: int | None, members: set[int], strays: set[int], sig: int) -> None:
    if members:
        tree.host.signal_pids(sorted(members), sig, check=lambda pid: tree.is_member(pid, name))
    if strays and uid is not None:
        tree.host.signal_pids(sorted(strays), sig, uid=uid)


def _emptied(tree: CgroupTree, name: str, timeout: float = SETTLE_TIMEOUT) -> bool:
    """Wait up to ``timeout`` seconds for the sliver's groups to have no member left."""
    deadline = tree.host.monotonic() + timeout
    while tree.members_of(name):
        if tree.host.monotonic() >= deadline:
            return False
        tree.host.sleep(0.02)
    return True
