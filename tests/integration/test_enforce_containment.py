"""Containment against a hostile sliver, on the real kernel (issue 10, items 3 and 4): a fork loop
held at its task limit and stopped through the cgroup within the 10 s bound while other work
goes on; a login that allocates at once killed inside its sliver thanks to placement at once; a
reused pid never signalled; leftover groups swept away.

Real accounts (prefix ``nmb``, always removed) and a private cgroup parent per test (never a
real node manager's ``nodemanager``), removed whatever happens. Programs run as the sliver use
/usr/bin/python3 (root's python here is private).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodemanager.config import Config, EnforceSection
from nodemanager.core.rspec import rspec_from_attributes
from nodemanager.enforce.cgroups import CgroupTree, detect_hierarchies
from nodemanager.enforce.limits import PidsEnforcer
from nodemanager.enforce.set import EnforcementSet
from nodemanager.enforce.tasks import kill_and_remove, stop_sliver
from nodemanager.enforcing import EnforcementHooks
from nodemanager.host import Host
from nodemanager.testing.accounts import purge_accounts, wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, accounts, process events)"),
]

SYSTEM_PYTHON = "/usr/bin/python3"
#: Every process ignores SIGTERM and forks for ever; a refused fork is retried a moment later.
FORK_LOOP = ("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "while True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.001)\n")
#: Allocate and touch 256 MiB at once.
HOG = "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096):\n    b[i] = 1\n"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    home: Path


@pytest.fixture
def account(home_root: Path) -> Iterator[Account]:
    name = f"nmb{secrets.token_hex(3)}"
    home = home_root / name
    try:
        subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh",
                        "--home-dir", str(home), name], check=True, capture_output=True)
        uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout)
        home.mkdir(mode=0o700)
        os.chown(home, uid, uid)
        yield Account(name, uid, home)
    finally:
        purge_accounts(name)


@pytest.fixture
def enforcement() -> Iterator[EnforcementSet]:
    """cpu, memory, pids (and freezer, tracking) under a private parent group."""
    host = Host()
    result = EnforcementSet.from_config(Config(enforce=EnforceSection(bandwidth=False, disk=False)), host,
                                        cgroup_group=f"nmbtest{secrets.token_hex(3)}")
    try:
        result.probe()
        if result.tree is None or any(e not in {x.name for x in result.enforcers} for e in ("memory", "pids")):
            pytest.skip(f"cgroups unavailable here: {result.problems()}")
        yield result
    finally:
        if result.placement is not None:
            result.placement.stop()
        tree = result.tree
        if tree is not None:
            for h in tree.used():
                for name in host.list_dirs(tree.parent(h)):
                    kill_and_remove(tree, name, None)
                host.remove_dir(tree.parent(h))


def limits(**values: int) -> dict[str, int]:
    return {**rspec_from_attributes(()), **values}


def read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def test_a_fork_loop_stays_within_its_task_limit_and_stops_within_ten_seconds(
    enforcement: EnforcementSet, account: Account
) -> None:
    tree = enforcement.tree
    assert tree is not None
    enforcement.prepare_sliver(account.name, account.uid, limits(nm_pids_max=256))
    pids_group = tree.parent(tree.hierarchy_for("pids")) / account.name  # type: ignore[arg-type]
    other_work = {"ran": 0, "failed": 0}
    done = threading.Event()

    def keep_working() -> None:  # the node's own work must go on beside the sliver
        while not done.is_set():
            if subprocess.run(["/bin/true"], check=False).returncode == 0:
                other_work["ran"] += 1
            else:
                other_work["failed"] += 1

    worker = threading.Thread(target=keep_working, daemon=True)
    worker.start()
    try:
        Host().spawn_detached([SYSTEM_PYTHON, "-c", FORK_LOOP], uid=account.uid, gid=account.uid, home=account.home,
                              env={"PATH": "/usr/bin:/bin"}, log_path=account.home / "fork.log",
                              cgroups=enforcement.cgroups(account.name))
        samples: list[int] = []
        assert wait_for(lambda: samples.append(read_int(pids_group / "pids.current")) or samples[-1] >= 256,
                        timeout=20, interval=0.01), f"the fork loop never reached its limit: {max(samples)}"
        end = time.monotonic() + 2
        while time.monotonic() < end:  # hammering against the limit: it holds
            samples.append(read_int(pids_group / "pids.current"))
            samples.append(len((pids_group / "tasks").read_text().split()) if (pids_group / "tasks").exists()
                           else read_int(pids_group / "pids.current"))
            time.sleep(0.01)
        refused = [line for line in (pids_group / "pids.events").read_text().splitlines() if line.startswith("max")]
        print(f"fork loop under pids.max 256: peak {max(samples)} tasks in {len(samples)} samples; "
              f"forks refused: {refused}; other work meanwhile: {other_work}")
        assert max(samples) <= 256
        assert refused and int(refused[0].split()[1]) > 0  # the loop really pushed against the limit
        hooks = EnforcementHooks(enforcement, lambda: None)
        start = time.monotonic()
        assert hooks.stop_processes(account.name, account.uid, grace=1.0)
        hooks.before_removal(account.name, account.uid)
        took = time.monotonic() - start
        print(f"stop + removal of the fork loop: {took:.2f} s")
        assert took < 10.0
        assert Host().pids_of_uid(account.uid) == []
        assert all(not d.exists() for d in enforcement.cgroups(account.name))
    finally:
        done.set()
        worker.join(10)
    assert other_work["failed"] == 0 and other_work["ran"] > 0


def test_a_login_that_allocates_at_once_is_killed_inside_its_sliver(
    enforcement: EnforcementSet, account: Account
) -> None:
    """As sshd starts a session: root changes to the sliver's uid and runs its program. The
    listener puts it in the sliver's groups before it can allocate much, so a 64 MiB limit kills
    a process that touches 256 MiB at once, in the sliver's memory cgroup."""
    tree = enforcement.tree
    assert tree is not None and enforcement.placement is not None
    enforcement.prepare_sliver(account.name, account.uid, limits(nm_memory_max=64 * 1024))
    if not enforcement.placement.start():
        pytest.skip(enforcement.placement.problem or "no process events")
    memory = tree.hierarchy_for("memory")
    assert memory is not None
    group = tree.parent(memory) / account.name
    events = group / ("memory.events" if memory.version == 2 else "memory.oom_control")
    login = subprocess.run(["setpriv", f"--reuid={account.uid}", f"--regid={account.uid}", "--clear-groups",
                            SYSTEM_PYTHON, "-c", HOG], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                           capture_output=True, timeout=120, check=False)
    kills = [int(line.split()[1]) for line in events.read_text().splitlines() if line.startswith("oom_kill ")]
    print(f"login touching 256 MiB under 64 MiB: exit {login.returncode}, oom kills in its group {kills}, "
          f"placed {enforcement.placement.placed}")
    assert login.returncode == -signal.SIGKILL
    assert kills and kills[0] >= 1  # the OOM killer acted in the sliver's group, not the node's


def test_a_reused_pid_is_never_signalled(account: Account) -> None:
    """The sliver's process exits and its pid goes to root's next process: a signal meant for
    the sliver (the uid is checked once the process is open as a pidfd) never reaches it."""
    host = Host()
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    stranger = None
    for _ in range(50):
        victim = subprocess.Popen(["sleep", "60"], user=account.uid, group=account.uid, extra_groups=[])
        pid = victim.pid
        victim.kill()
        victim.wait()
        last_pid.write_text(str(pid - 1))
        stranger = subprocess.Popen(["sleep", "60"])
        if stranger.pid == pid:
            break
        stranger.kill()
        stranger.wait()
        stranger = None
    if stranger is None:
        pytest.skip("other processes kept taking the pid")
    try:
        assert host.signal_pids([pid], signal.SIGKILL, uid=account.uid) == 0
        host.kill(pid, signal.SIGKILL, uid=account.uid)
        time.sleep(0.1)
        assert stranger.poll() is None
        assert host.signal_pids([pid], 0, uid=0) == 1  # the check itself works: it is root's
    finally:
        stranger.kill()
        stranger.wait()


def test_the_sweep_removes_groups_of_no_sliver_and_keeps_the_others(enforcement: EnforcementSet) -> None:
    tree = enforcement.tree
    assert tree is not None
    prefix = "nmbsw"
    sleepers = {}
    for name in (f"{prefix}_gone_busy", f"{prefix}_gone_empty", f"{prefix}_kept", "unrelated_x"):
        tree.ensure(name)
        if not name.endswith("empty"):
            proc = subprocess.Popen(["sleep", "600"])
            for d in tree.dirs(name):
                (d / "cgroup.procs").write_text(str(proc.pid))
            sleepers[name] = proc
    try:
        removed = enforcement.sweep({f"{prefix}_kept"}, is_ours=lambda n: n.startswith(prefix))
        assert removed == [f"{prefix}_gone_busy", f"{prefix}_gone_empty"]
        assert sleepers[f"{prefix}_gone_busy"].wait(timeout=10) == -signal.SIGKILL
        for name in removed:
            assert all(not d.exists() for d in tree.dirs(name))
        for name in (f"{prefix}_kept", "unrelated_x"):
            assert all(d.exists() for d in tree.dirs(name)) and sleepers[name].poll() is None
    finally:
        for proc in sleepers.values():
            proc.kill()
            proc.wait()


def test_without_cgroup_kill_the_v1_freezer_stops_a_fork_loop(account: Account) -> None:
    """The path of v1-only hosts (and kernels before 5.14): freeze, SIGKILL every member, thaw."""
    host = Host()
    tree = CgroupTree(host, ["cpu", "pids", "freezer"], group=f"nmbtest{secrets.token_hex(3)}",
                      hierarchies=[h for h in detect_hierarchies(host) if h.version == 1])
    if tree.missing("pids") or tree.missing("freezer"):
        pytest.skip("no v1 pids and freezer hierarchies here")
    try:
        tree.ensure_parents()
        tree.ensure(account.name)
        PidsEnforcer(tree).prepare(account.name, limits(nm_pids_max=256))
        host.spawn_detached([SYSTEM_PYTHON, "-c", FORK_LOOP], uid=account.uid, gid=account.uid, home=account.home,
                            env={"PATH": "/usr/bin:/bin"}, log_path=account.home / "fork.log",
                            cgroups=tree.dirs(account.name))
        assert wait_for(lambda: len(tree.members_of(account.name)) >= 100, timeout=20)
        start = time.monotonic()
        stopped = stop_sliver(tree, account.name, account.uid, grace=0.5)
        took = time.monotonic() - start
        print(f"v1 freezer stop of a fork loop: {took:.2f} s, {stopped.kill_rounds} kill round(s)")
        assert took < 10.0 and stopped.kill_rounds >= 1
        assert host.pids_of_uid(account.uid) == [] and not tree.members_of(account.name)
        freezer = tree.hierarchy_for("freezer")
        assert freezer is not None
        assert (tree.parent(freezer) / account.name / "freezer.state").read_text().strip() == "THAWED"
    finally:
        for name in host.list_dirs(tree.parent(tree.used()[0])):
            kill_and_remove(tree, name, account.uid)
        for h in tree.used():
            host.remove_dir(tree.parent(h))
