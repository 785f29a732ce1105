"""The observer role for real (root): an observer slice over a real sshd, and a local account
named in ``api.observers`` calling over the Unix socket as its own uid (api.md "Observer").

Pieces, all real: :class:`PrivateSshd` on a loopback port, sliver accounts made through
``SliverOperations`` + ``AccountBackend`` with a delegate shell, the daemon's ``ApiServer``
serving ``NodeManagerApi`` on a Unix socket, and a real unprivileged local account for the
monitoring agent. A process of the target sliver runs throughout, to show that a refused Stop
left it alone.

Accounts are named ``nmo...`` and always removed; the shells file is a copy of /etc/shells in the
test's directory. forward_api_calls runs from the installed console script when every user can
execute it, else from a copy of its source file run by /usr/bin/python3
(``nodemanager.testing.story.forward_command``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import xmlrpc.client
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodemanager.api.client import local_proxy
from nodemanager.api.methods import NodeManagerApi, caller_resolver
from nodemanager.api.server import ApiServer
from nodemanager.backends.account import AccountBackend
from nodemanager.core.records import OBSERVER_TAG, PLC_INSTANTIATED, Phase, Sliver
from nodemanager.host import Host
from nodemanager.operations import SliverOperations
from nodemanager.store import Store
from nodemanager.testing.accounts import (
    private_keys_dir,
    purge_account,
    removed_group,
    uid_base_for_tests,
    wait_for,
)
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.sshd import PrivateSshd, make_client_key
from nodemanager.testing.story import forward_command, real_sshd_marks
from nodemanager.workers import WorkerPool

pytestmark = real_sshd_marks()

PREFIX = "nmo"
DENIED_TAIL = "observers may call only GetXIDs, GetSSHKeys, GetRSpec, GetEffectiveRSpec, GetLoans"


def sliver(name: str, keys: tuple[str, ...] = (), attributes: tuple[tuple[str, str], ...] = ()) -> Sliver:
    return Sliver(name=name, slice_id=zlib.crc32(name.encode()) % 10**6, instantiation=PLC_INSTANTIATED,
                  expires=2**31 - 1, timestamp=1, keys=keys, attributes=attributes)


@dataclass
class Node:
    home_root: Path
    socket: Path
    store: Store
    backend: AccountBackend
    forward: list[str]
    observer: str          # the observer sliver
    target: str            # an ordinary sliver, running
    monitor: str           # the local account named in api.observers
    key: Path
    victim: subprocess.Popen[bytes]

    def uid(self, name: str) -> int:
        state = self.store.account(name)
        assert state is not None and state.uid is not None
        return state.uid


@pytest.fixture
def node(home_root: Path, tmp_path: Path) -> Iterator[Node]:
    n = os.getpid() % 100000
    observer, target, monitor = f"it_obs{n}", f"it_tgt{n}", f"{PREFIX}mon{n}"
    run_dir = home_root / "run"
    run_dir.mkdir(mode=0o755)
    socket_path, shells = run_dir / "api.sock", home_root / "shells"
    shutil.copyfile("/etc/shells", shells)
    key, public = make_client_key(tmp_path)
    victim: subprocess.Popen[bytes] | None = None
    with private_keys_dir() as keys_dir, removed_group(f"{PREFIX}grp{n}") as group:
        store = Store(tmp_path / "nm.db")
        backend = AccountBackend(Host(), home_root=home_root, shell="/bin/sh", name_prefix=PREFIX, stop_grace=1.0,
                                 uid_base=uid_base_for_tests(), keys_dir=keys_dir, group=group,
                                 delegate_shell=run_dir / "delegate-shell", delegate_socket=str(socket_path),
                                 forward_command=forward_command(home_root), shells_file=shells)
        ops = SliverOperations(store, backend, ManualClock())
        pool = WorkerPool(2)
        api = NodeManagerApi(store=store, pool=pool, operations=ops,
                             resolve_caller=caller_resolver(store, Host().getpwuid, [monitor]),
                             operation_timeout=30.0)
        server = ApiServer(api.dispatch, tcp="", unix_socket=str(socket_path))
        try:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", "--user-group", monitor], check=True, capture_output=True)
            records = [sliver(observer, (public,), ((OBSERVER_TAG, "1"),)),
                       sliver(target, attributes=(("nm_cpu_share", "3"),))]
            store.apply_records(records, [])
            for record in records:
                ops.ensure(record)
            ops.start(target)
            target_uid = store.account(target).uid  # type: ignore[union-attr]
            victim = subprocess.Popen(["sleep", "600"], user=target_uid, group=target_uid, extra_groups=[],
                                      cwd="/", env={"PATH": "/usr/bin:/bin"})
            server.start()
            assert backend.delegate is not None
            yield Node(home_root, socket_path, store, backend, backend.delegate.forward_command,
                       observer, target, monitor, key, victim)
        finally:
            server.stop()
            pool.shutdown(timeout=10)
            store.close()
            if victim is not None and victim.poll() is None:
                victim.kill()
            if victim is not None:
                victim.wait(10)
            for account in (PREFIX + observer, PREFIX + target, monitor):
                purge_account(account)


def call_over_ssh(sshd: PrivateSshd, node: Node, method: str, *params: Any) -> Any:
    """One call as ``ssh OBSERVER@node``; a Fault is raised as xmlrpc.client.Fault."""
    argv = ["ssh", *sshd.ssh_options(node.key), "-o", "BatchMode=yes", f"{PREFIX}{node.observer}@127.0.0.1"]
    done = subprocess.run(argv, input=xmlrpc.client.dumps(params, method).encode(), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, (done.stderr, sshd.log()[-2000:])
    return xmlrpc.client.loads(done.stdout)[0][0]


def call_as(uid: int, node: Node, method: str, *params: Any) -> Any:
    """One call over the Unix socket from a process running as ``uid`` (its own group only)."""
    entry = Host().getpwuid(uid)
    assert entry is not None
    done = subprocess.run([*node.forward, "--socket", str(node.socket)],
                          input=xmlrpc.client.dumps(params, method).encode(), capture_output=True, timeout=60,
                          check=False, user=uid, group=entry.gid, extra_groups=[], cwd="/",
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return xmlrpc.client.loads(done.stdout)[0][0]


def test_an_observer_slice_over_ssh_reads_others_and_cannot_stop_them(node: Node, tmp_path: Path) -> None:
    entry = Host().getpwnam(PREFIX + node.observer)
    assert entry is not None and node.backend.delegate is not None
    assert entry.shell == str(node.backend.delegate.path)  # a delegate account, like a controller's
    assert (node.home_root / entry.name / ".hushlogin").stat().st_uid == 0
    with PrivateSshd(use_pam=True, keys_dir=node.backend.keys_dir, sliver_group=node.backend.group) as sshd:
        rspec = call_over_ssh(sshd, node, "GetRSpec", node.target)
        assert rspec["nm_cpu_share"] == 3
        assert call_over_ssh(sshd, node, "GetLoans", node.target) == []
        assert call_over_ssh(sshd, node, "GetXIDs")[node.target] == node.uid(node.target)
        with pytest.raises(xmlrpc.client.Fault) as caught:
            call_over_ssh(sshd, node, "Stop", node.target)
        assert caught.value.faultCode == 108
        assert caught.value.faultString.endswith(DENIED_TAIL)
        assert f"observer sliver {node.observer}" in caught.value.faultString
        # its own sliver is still its own
        assert call_over_ssh(sshd, node, "SetLoans", node.observer, []) == 1
    assert node.victim.poll() is None  # the target's process still runs
    state = node.store.account(node.target)
    assert state is not None and state.phase is Phase.RUNNING
    # root's Stop does end it: the refusal was about the caller
    with local_proxy(node.socket) as root_api:
        assert root_api.Stop(node.target) == 1
    assert wait_for(lambda: node.victim.poll() is not None)


def test_a_local_account_in_api_observers_reads_over_the_unix_socket(node: Node) -> None:
    monitor = Host().getpwnam(node.monitor)
    assert monitor is not None
    assert call_as(monitor.uid, node, "GetRSpec", node.target)["nm_cpu_share"] == 3
    assert call_as(monitor.uid, node, "GetEffectiveRSpec", node.observer)["nm_enabled"] == 1
    assert set(call_as(monitor.uid, node, "GetSSHKeys")) == {node.observer, node.target}
    with pytest.raises(xmlrpc.client.Fault) as caught:
        call_as(monitor.uid, node, "SetLoans", node.target, [[node.observer, "nm_cpu_share", 1]])
    assert caught.value.faultCode == 108
    assert "an observer local account" in caught.value.faultString
    assert node.store.loans().get(node.target, ()) == ()
    # a sliver that is no observer, over the same socket: no read access to others
    with pytest.raises(xmlrpc.client.Fault) as caught:
        call_as(node.uid(node.target), node, "GetRSpec", node.observer)
    assert caught.value.faultCode == 108 and "observers may" not in caught.value.faultString
