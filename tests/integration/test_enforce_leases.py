"""Leases on the real kernel: at ``t_from`` every other non-system sliver is frozen (cgroup freezer,
its CPU time stops), the leased one and the system one keep running; at ``t_until`` the frozen
sliver resumes with the same processes (never killed).

Real accounts (prefix ``nmx``, always removed), a private cgroup parent group, the real
``LeaseScheduler`` thread on the system clock, its schedule read from a real store.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.clock import SystemClock
from nodemanager.core.records import AccountState, AuthorityDocument, Phase
from nodemanager.enforce.cgroups import CgroupTree
from nodemanager.enforce.set import EnforcementSet
from nodemanager.enforce.tasks import kill_and_remove
from nodemanager.host import Host
from nodemanager.testing.accounts import ScratchAccount, scratch_accounts
from nodemanager.leasing import CgroupFreezer, LeaseHandler, LeaseScheduler
from nodemanager.store import Store
from nodemanager.testing.fakeauthority import make_sliver

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, accounts)"),
]


class Sliver(ScratchAccount):
    @property
    def sliver(self) -> str:
        return self.name[3:]


@pytest.fixture
def slivers(home_root: Path) -> Iterator[list[Sliver]]:
    with scratch_accounts(home_root, prefix="nmxsite_") as made:
        yield [Sliver(a.name, a.uid, a.home) for a in made]


@pytest.fixture
def tree(slivers: list[Sliver]) -> Iterator[CgroupTree]:
    host = Host()
    t = CgroupTree(host, ("cpu", "freezer"), group=f"nmxtest{secrets.token_hex(3)}")
    if t.missing("cpu"):
        pytest.skip(t.missing("cpu") or "")
    try:
        yield t
    finally:
        for s in slivers:
            if t.existing(s.name):
                t.thaw(s.name)
            kill_and_remove(t, s.name, s.uid)
        for h in t.used():
            host.remove_dir(t.parent(h))


def ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def freezer_state(tree: CgroupTree, name: str) -> str:
    v1 = next(h for h in tree.used() if h.version == 1 and "freezer" in h.controllers)
    return (tree.parent(v1) / name / "freezer.state").read_text().strip()


def test_a_lease_freezes_the_others_and_resumes_them_with_the_same_processes(
        tree: CgroupTree, slivers: list[Sliver], tmp_path: Path) -> None:
    if not any(h.version == 1 and "freezer" in h.controllers for h in tree.used()):
        pytest.skip("no cgroup v1 freezer hierarchy here")
    leased, other, system = slivers
    tree.ensure_parents()
    for s in slivers:
        tree.ensure(s.name)
        Host().spawn_detached(["/bin/sh", "-c", "while :; do :; done"], uid=s.uid, gid=s.uid, home=s.home,
                              env={"PATH": "/usr/bin:/bin"}, log_path=s.home / "busy.log", cgroups=tree.dirs(s.name))
    deadline = time.monotonic() + 5
    while not all(len(tree.members_of(s.name)) == 1 for s in slivers):
        assert time.monotonic() < deadline, "busy loops did not start"
        time.sleep(0.02)
    pids = {s.name: next(iter(tree.members_of(s.name))) for s in slivers}
    store = Store(tmp_path / "s.sqlite")
    store.open()
    store.apply_records([make_sliver(leased.sliver), make_sliver(other.sliver),
                         make_sliver(system.sliver, attributes=[("system", "1")])], [])
    for s in slivers:
        store.put_account(AccountState(name=s.sliver, uid=s.uid, owned=True, phase=Phase.RUNNING))
    scheduler = LeaseScheduler(store, SystemClock(), freezer=CgroupFreezer(EnforcementSet([], tree=tree)),
                               account_of=lambda name: "nmx" + name)
    t_from = math.ceil(time.time()) + 1
    t_until = t_from + 3
    LeaseHandler(store, scheduler.poke).apply(AuthorityDocument(timestamp=1, node_id=1, members={
        "reservation_policy": "lease_or_shared", "lease_granularity": 1,
        "leases": [{"slice_id": 1, "name": leased.sliver, "t_from": t_from, "t_until": t_until}]}))
    scheduler.start()
    try:
        while time.time() < t_from + 1.0:
            assert freezer_state(tree, system.name) == "THAWED"
            if freezer_state(tree, other.name) == "FROZEN":
                break
            time.sleep(0.02)
        frozen_at = time.time()
        assert freezer_state(tree, other.name) == "FROZEN", "not frozen within 1 s of t_from"
        assert frozen_at - t_from < 1.0
        print(f"frozen {frozen_at - t_from:+.3f} s after t_from")
        before = {n: ticks(p) for n, p in pids.items()}
        time.sleep(1.0)
        after = {n: ticks(p) for n, p in pids.items()}
        assert after[other.name] == before[other.name]  # its CPU time stopped
        assert after[leased.name] > before[leased.name] and after[system.name] > before[system.name]
        assert freezer_state(tree, leased.name) == freezer_state(tree, system.name) == "THAWED"
        while time.time() < t_until + 1.0 and freezer_state(tree, other.name) != "THAWED":
            time.sleep(0.02)
        assert freezer_state(tree, other.name) == "THAWED" and time.time() - t_until < 1.0
        print(f"thawed {time.time() - t_until:+.3f} s after t_until")
        resumed = ticks(pids[other.name])
        time.sleep(0.5)
        assert ticks(pids[other.name]) > resumed  # the same process runs again
        assert all(Path(f"/proc/{pid}").exists() for pid in pids.values())
        assert {p for s in slivers for p in tree.members_of(s.name)} == set(pids.values())
    finally:
        scheduler.stop()
        store.close()


DAEMON_PREFIX = "nmw"


def processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes of ``uid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            found.append(int(entry))
    return found


def test_a_sliver_created_frozen_is_started_when_its_lease_thaws_it(tmp_path: Path, home_root: Path) -> None:
    """The daemon as built: under ``lease_or_idle`` a new sliver is created while the schedule
    freezes it, so its start is deferred (no process of its uid, phase stopped, ``start_pending``);
    when its lease starts, the scheduler thaws it and its worker starts it: its initscript runs
    (a process of its uid) within 2 s of ``t_from``."""
    from nodemanager.config import parse_config
    from nodemanager.daemon import build_node
    from nodemanager.testing.accounts import purge_accounts, uid_base_for_tests, wait_for

    purge_accounts(DAEMON_PREFIX + "site_")
    t_from = math.ceil(time.time()) + 5
    doc = tmp_path / "slivers.json"
    doc.write_text(json.dumps({
        "timestamp": 1000, "node_id": 1, "reservation_policy": "lease_or_idle", "lease_granularity": 1,
        "leases": [{"slice_id": 1, "name": "site_a", "t_from": t_from, "t_until": t_from + 120}],
        "slivers": [{"name": "site_a", "slice_id": 1, "instantiation": "plc-instantiated",
                     "expires": int(time.time()) + 86400, "keys": [],
                     "attributes": [{"tagname": "initscript_code", "value": "#!/bin/sh\nexec sleep 600\n"}]}]}))
    (tmp_path / "node_id").write_text("1\n")
    config = parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": str(tmp_path / "nm.log")},
        "authority": {"url": f"file://{doc}", "node_id_file": str(tmp_path / "node_id"), "poll_jitter": 0},
        "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""},
        "slivers": {"home_root": str(home_root), "name_prefix": DAEMON_PREFIX, "stop_grace": 1,
                    "keys_dir": str(tmp_path / "keys"), "uid_base": uid_base_for_tests(),
                    "group": DAEMON_PREFIX + "slivers"},
        "enforce": {"cpu": True, "memory": False, "bandwidth": False, "disk": False},
    })
    nm = build_node(config)
    if nm.enforcement is None or nm.enforcement.tree is None:
        pytest.skip("no cgroup enforcement here")
    try:
        nm.start()
        assert nm.sync_once(wait=True).ok
        assert time.time() < t_from - 1, "the sync took too long for this test's schedule"
        state = nm.store.account("site_a")
        assert state is not None and state.uid is not None
        assert state.phase is Phase.STOPPED and state.start_pending
        uid = state.uid
        time.sleep(0.7)  # the scheduler has seen it (locked, frozen if it has a group)
        assert processes_of(uid) == [] and nm.store.account("site_a").start_pending  # type: ignore[union-attr]
        while time.time() < t_from:
            time.sleep(0.02)
        assert wait_for(lambda: processes_of(uid) != [], timeout=2.0), "the initscript did not run within 2 s"
        print(f"initscript running {time.time() - t_from:+.3f} s after t_from")
        assert wait_for(lambda: (s := nm.store.account("site_a")) is not None
                        and s.phase is Phase.RUNNING and not s.start_pending, timeout=2.0)
    finally:
        nm.close()
        purge_accounts(DAEMON_PREFIX + "site_")
        subprocess.run(["groupdel", DAEMON_PREFIX + "slivers"], capture_output=True, check=False)
