"""What must hold after any crash and a restart (issue 11, "Deterministic crash simulation").

Checked on the world a restarted node has converged on:

* the machine converges to the document: every sliver the records want (auto-instantiated, or
  delegated with a Create request; not expired) has exactly one managed account, and there is no
  other managed account;
* no uid is lost or duplicated: each account's uid is ``uid_base + slice_id``, all distinct, and
  the store records that uid;
* no account the node does not own is touched: the foreign accounts seeded before the first node
  (and their homes, files and processes) are exactly as they were;
* no sliver stays in a transitional or failed phase once its operation can succeed (only a
  sliver whose name a foreign account holds may stay failed), and nothing is left to plan;
* every live sliver is enforced, and nothing of a sliver that is gone remains: processes here;
  cgroups, HTB classes, nft entries, mounts, loop devices, images, keys, homes, files in shared
  directories and SysV IPC in ``kernel_invariants`` (``EXTRA_CHECKS``), which also requires that
  another enforcement pass changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from nodemanager.backends.account import MANAGED_GECOS
from nodemanager.core.plan import plan_actions
from nodemanager.core.records import Phase, Sliver
from nodemanager.daemon import Node

from .harness import PREFIX, UID_BASE, World
from .kernel_invariants import KERNEL_CHECKS

#: Checks of the machine model's kernel objects (``kernel_invariants``), given the live slivers.
EXTRA_CHECKS: list[Callable[[World, Node, set[str]], list[str]]] = list(KERNEL_CHECKS)


def wanted_names(node: Node, now: float) -> set[str]:
    accounts = node.store.accounts()
    return {
        name for name, record in node.store.slivers().items()
        if record.expires > now
        and (record.auto_instantiated or (name in accounts and accounts[name].create_requested))
    }


def check_invariants(world: World, node: Node, final: list[Sliver]) -> list[str]:
    problems: list[str] = []
    now = world.clock.now()
    records = node.store.slivers()
    accounts = node.store.accounts()
    for sliver in final:
        if sliver.expires > now and sliver.name not in records:
            problems.append(f"{sliver.name}: in the document but has no record")
    foreign = set(world.foreign.get("names", ()))
    wanted = wanted_names(node, now) - foreign
    managed = {
        entry.name[len(PREFIX):]: entry for entry in world.host.users.values()
        if entry.name.startswith(PREFIX) and entry.gecos == MANAGED_GECOS
    }
    if set(managed) != wanted:
        problems.append(f"managed accounts {sorted(managed)} != wanted {sorted(wanted)}")
    uids = [entry.uid for entry in managed.values()]
    if len(set(uids)) != len(uids):
        problems.append(f"duplicate uids: {sorted(uids)}")
    for name, entry in managed.items():
        record = records.get(name)
        if record is not None and entry.uid != UID_BASE + record.slice_id:
            problems.append(f"{name}: uid {entry.uid} is not uid_base + slice id {record.slice_id}")
        state = accounts.get(name)
        if state is None or not state.owned or state.uid != entry.uid:
            problems.append(f"{name}: store state {state} does not record account uid {entry.uid}")
        elif state.phase not in (Phase.STOPPED, Phase.RUNNING) or state.failures:
            problems.append(f"{name}: left {state.phase.value} ({state.last_error})")
    for name, state in accounts.items():
        if state.owned and name not in wanted:
            problems.append(f"{name}: owned state {state.phase.value} left for a sliver that is not wanted")
    snapshot = world.foreign.get("snapshot")
    if snapshot is not None and snapshot_foreign(world) != snapshot:
        problems.append(f"{', '.join(sorted(foreign))}: the foreign account or its files changed")
    leftover = plan_actions(records, accounts, node.backend.observe(), now, may_destroy_orphans=True,
                            honour_backoff=False)
    leftover = [a for a in leftover if a.name not in foreign]
    if leftover:
        problems.append(f"still to do: {[(a.kind.value, a.name, a.reason) for a in leftover]}")
    live_uids = {entry.uid for entry in managed.values()}
    for pid, uid in sorted(world.host.processes.items()):
        if uid >= UID_BASE and uid not in live_uids and uid not in world.foreign.get("uids", ()):
            problems.append(f"process {pid} of uid {uid} (no live sliver) still runs")
    for extra in EXTRA_CHECKS:
        problems += extra(world, node, set(managed))
    return problems


def snapshot_foreign(world: World) -> tuple[object, ...]:
    """Everything of the foreign accounts: passwd/group/shadow entries, files and directories
    under their homes, their processes."""
    names = world.foreign.get("accounts", ())
    homes = [world.host.users[n].home for n in names if n in world.host.users]
    under = lambda path: any(str(path).startswith(home) for home in homes)  # noqa: E731
    return (
        tuple(world.host.users.get(n) for n in names),
        tuple(world.host.groups.get(n) for n in names),
        tuple(world.host.shadow.get(n) for n in names),
        tuple(sorted((str(p), f) for p, f in world.host.files.items() if under(p))),
        tuple(sorted((str(p), d) for p, d in world.host.dirs.items() if under(p))),
        tuple(sorted((pid, uid) for pid, uid in world.host.processes.items() if uid in world.foreign.get("uids", ()))),
    )
