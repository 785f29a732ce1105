"""The hostile-sliver suite against a real daemon (issue 10, "How it is shown").

One node manager as the daemon runs it (``build_node`` + ``start``: API on TCP and on a Unix
socket, the enforcement loop with placement at once, cpu/memory/pids cgroups), real accounts
(prefix ``nmh``), a real private sshd carrying the node's ``Match Group`` block. Each attack is
made by a real unprivileged sliver account, as itself, and the node's promise is checked after:

* the TCP identity race, 200 times under concurrent load: no call served as anyone but the
  caller (the victim's Stop is never allowed, the victim keeps running);
* a fork loop under ``nm_pids_max = 256`` never has more than 256 tasks, and Destroy ends it in
  under 10 s while the API keeps answering;
* a login that allocates 256 MiB at once under a 64 MiB limit is killed (inside its sliver);
* disabling a sliver that sabotaged its ``~/.ssh`` leaves no process of it and no way in;
* a destroyed slice's files in /tmp are gone before its uid is reused (by the same slice).

Programs a sliver runs use ``/usr/bin/python3`` or ``/bin/sh``: root's own interpreter may be a
private build other users cannot execute.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodemanager.api.client import local_proxy
from nodemanager.config import parse_config
from nodemanager.daemon import Node, build_node
from nodemanager.host import Host
from nodemanager.testing.accounts import (
    private_keys_dir,
    purge_accounts,
    removed_group,
    uid_base_for_tests,
    unmount_below,
    wait_for,
)
from nodemanager.testing.fakeauthority import stable_slice_id
from nodemanager.testing.sshd import PrivateSshd, make_client_key, sshd_available

PREFIX = "nmh"
SYSTEM_PYTHON = "/usr/bin/python3"
SLEEPER = "#!/bin/sh\nexec sleep 3600\n"

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real accounts, cgroups"),
    pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON} for sliver programs"),
]


@dataclass
class Daemon:
    node: Node
    doc: Path
    keys_dir: Path
    group: str
    stamp: int = 1000

    def publish(self, slivers: dict[str, dict[str, str]], *, keys: dict[str, str] | None = None) -> None:
        """Serve ``slivers`` (name -> attributes) and run one cycle, waiting for its work."""
        self.stamp += 10
        entries = [{
            "name": name, "slice_id": stable_slice_id(name), "instantiation": attrs.pop("instantiation", "plc-instantiated"),
            "expires": int(time.time()) + 86400,
            "keys": [{"key_type": "ssh", "key": keys[name]}] if keys and name in keys else [],
            "attributes": [{"tagname": "initscript_code", "value": SLEEPER}]
                          + [{"tagname": k, "value": v} for k, v in attrs.items()],
        } for name, attrs in ((n, dict(a)) for n, a in slivers.items())]
        self.doc.write_text(json.dumps({"timestamp": self.stamp, "node_id": 1, "slivers": entries}))
        outcome = self.node.sync_once(wait=True)
        assert outcome.ok, outcome.summary()

    def uid(self, name: str) -> int:
        state = self.node.store.account(name)
        assert state is not None and state.uid is not None, name
        return state.uid

    def metric(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(self.node.metrics.render().decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0


@pytest.fixture
def daemon(tmp_path: Path, home_root: Path) -> Iterator[Daemon]:
    purge_accounts(PREFIX + "site_")
    doc = tmp_path / "slivers.json"
    doc.write_text(json.dumps({"timestamp": 1000, "node_id": 1, "slivers": []}))
    (tmp_path / "node_id").write_text("1\n")
    run_dir = home_root / "run"
    run_dir.mkdir(mode=0o755)
    with private_keys_dir() as keys_dir, removed_group(PREFIX + "slivers") as group:
        config = parse_config({
            "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
            "authority": {"url": f"file://{doc}", "node_id_file": str(tmp_path / "node_id")},
            "sync": {"max_delete_fraction": 1.0},
            "api": {"tcp": "127.0.0.1:0", "unix_socket": str(run_dir / "api.sock")},
            "metrics": {"listen": ""},
            "slivers": {"home_root": str(home_root), "name_prefix": PREFIX, "stop_grace": 1, "shell": "/bin/sh",
                        "uid_base": uid_base_for_tests(), "keys_dir": str(keys_dir), "group": group},
            "enforce": {"cpu": True, "memory": True, "bandwidth": False, "disk": False},
        })
        node = build_node(config, tickets=None)
        node.start()
        try:
            yield Daemon(node, doc, keys_dir, group)
        finally:
            node.close()
            unmount_below(home_root)
            purge_accounts(PREFIX + "site_")


def pids_of(uid: int) -> set[int]:
    """Live processes of ``uid`` (zombies waiting for their reaper are not processes any more)."""
    return set(Host().pids_of_uid(uid))


def as_sliver(uid: int, argv: list[str], *, output: bool = True) -> subprocess.Popen[str]:
    """``argv`` started as the sliver itself (its uid and group, no other group)."""
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen(argv, user=uid, group=uid, extra_groups=[], cwd="/", text=True,
                            stdout=pipe, stderr=pipe, env={"PATH": "/usr/bin:/bin"})


def cgroup_dir(daemon: Daemon, account: str, controller: str) -> Path:
    """The sliver's group in the hierarchy that has ``controller`` (v1 or v2)."""
    tree = daemon.node.enforcement.tree  # type: ignore[union-attr]
    hierarchy = tree.hierarchy_for(controller)
    assert hierarchy is not None, controller
    return tree.parent(hierarchy) / account


# --- the TCP identity race ---------------------------------------------------------------------

RACER = r"""
import socket, sys, xmlrpc.client
port, victim, attempts = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = xmlrpc.client.dumps((victim,), "Stop").encode()
request = b"POST / HTTP/1.1\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(body) + body
sent = 0
for _ in range(attempts):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(request)
        sent += 1
    except OSError:
        pass
    finally:
        sock.close()
print(sent)
"""


def test_a_sliver_racing_the_tcp_lookup_is_never_served_as_anyone_else(daemon: Daemon) -> None:
    daemon.publish({"site_victim": {}, "site_racer": {}})
    victim_uid, racer_uid = daemon.uid("site_victim"), daemon.uid("site_racer")
    assert wait_for(lambda: bool(pids_of(victim_uid)), 10)
    victims = pids_of(victim_uid)
    host, port = daemon.node.api_server.tcp_address  # type: ignore[union-attr, misc]
    stop, failures = threading.Event(), []

    def load() -> None:  # root's large requests, back to back: the server is busy
        body = xmlrpc.client.dumps(([1] * 30_000,), "GetXIDs").encode()
        head = f"POST / HTTP/1.1\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        while not stop.is_set():
            try:
                with socket.create_connection((host, port), timeout=10) as sock:
                    sock.sendall(head + body)
                    sock.recv(65536)
            except OSError as exc:
                failures.append(repr(exc))

    loaders = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for thread in loaders:
        thread.start()
    try:
        racer = as_sliver(racer_uid, [SYSTEM_PYTHON, "-c", RACER, str(port), "site_victim", "200"])
        out, err = racer.communicate(timeout=300)
    finally:
        stop.set()
        for thread in loaders:
            thread.join(30)
    assert racer.returncode == 0 and int(out) == 200, err
    time.sleep(1.0)  # the last attempts are answered
    assert daemon.metric("nodemanager_api_requests_total", method="Stop", code="ok") == 0
    assert daemon.metric("nodemanager_api_requests_total", method="Stop", code="108") > 0
    assert victims <= pids_of(victim_uid)  # the victim was never stopped
    assert daemon.node.store.account("site_victim").phase.value == "running"  # type: ignore[union-attr]


# --- a fork loop, and Destroy while the API answers ----------------------------------------------

FORK_LOOP = r"""
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
    except OSError:
        time.sleep(0.001)
"""


def test_a_fork_loop_stays_within_its_task_limit_and_destroy_ends_it_while_the_api_answers(daemon: Daemon) -> None:
    daemon.publish({"site_forker": {"nm_pids_max": "256"}})
    uid = daemon.uid("site_forker")
    loop = as_sliver(uid, [SYSTEM_PYTHON, "-c", FORK_LOOP], output=False)
    group = cgroup_dir(daemon, PREFIX + "site_forker", "pids")
    tasks = group / "pids.current"
    assert wait_for(lambda: tasks.exists() and int(tasks.read_text()) >= 200, 30), "the loop never got going"
    peak = 0
    for _ in range(100):
        peak = max(peak, int(tasks.read_text()))
        time.sleep(0.01)
    assert peak <= 256

    answers, errors = [], []
    stop = threading.Event()

    def ask() -> None:
        with local_proxy(str(daemon.node.config.api.unix_socket), timeout=10) as api:
            while not stop.is_set():
                try:
                    started = time.monotonic()
                    api.GetXIDs()
                    answers.append(time.monotonic() - started)
                except Exception as exc:  # noqa: BLE001 - every failure is reported below
                    errors.append(repr(exc))
                time.sleep(0.02)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    started = time.monotonic()
    daemon.publish({})  # the authority drops it: Destroy
    elapsed = time.monotonic() - started
    stop.set()
    asker.join(30)
    loop.wait(30)
    assert elapsed < 10, elapsed
    assert not pids_of(uid)
    assert errors == [] and len(answers) >= 5, (errors[:3], len(answers))
    assert not group.exists()


# --- logins and disabling ------------------------------------------------------------------------

@pytest.fixture
def sshd(daemon: Daemon) -> Iterator[PrivateSshd]:
    if sshd_available() is not None:
        pytest.skip(f"no private sshd: {sshd_available()}")
    with PrivateSshd(use_pam=True, keys_dir=daemon.keys_dir, sliver_group=daemon.group) as server:
        yield server


def ssh(sshd: PrivateSshd, key: Path, account: str, command: str) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", *sshd.ssh_options(key), "-o", "BatchMode=yes", f"{account}@127.0.0.1", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_login_that_allocates_at_once_is_killed_inside_its_sliver(daemon: Daemon, sshd: PrivateSshd,
                                                                     tmp_path: Path) -> None:
    key, public = make_client_key(tmp_path)
    daemon.publish({"site_hog": {"nm_memory_max": "65536"}}, keys={"site_hog": public})
    account = PREFIX + "site_hog"
    group = cgroup_dir(daemon, account, "memory")
    events = group / ("memory.oom_control" if (group / "memory.oom_control").exists() else "memory.events")
    before = _oom_kills(events)
    done = ssh(sshd, key, account, f"{SYSTEM_PYTHON} -c 'b = bytearray(256 << 20); print(len(b))'")
    assert str(256 << 20) not in done.stdout, "the allocation succeeded"
    assert done.returncode != 0, done
    assert wait_for(lambda: _oom_kills(events) > before, 10), (done.stderr, _oom_kills(events))
    with local_proxy(str(daemon.node.config.api.unix_socket)) as api:
        assert api.Help()  # the node is fine


def _oom_kills(path: Path) -> int:
    for line in path.read_text().splitlines() if path.exists() else ():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def test_disabling_a_sliver_that_sabotaged_its_ssh_leaves_no_process_and_no_way_in(
    daemon: Daemon, sshd: PrivateSshd, tmp_path: Path,
) -> None:
    key, public = make_client_key(tmp_path)
    daemon.publish({"site_rogue": {}}, keys={"site_rogue": public})
    account = PREFIX + "site_rogue"
    uid = daemon.uid("site_rogue")
    assert ssh(sshd, key, account, "true").returncode == 0
    sabotage = ("rm -rf ~/.ssh && mkdir -p ~/.ssh/authorized_keys && cp /dev/null ~/.ssh/authorized_keys2 "
                f"&& echo '{public}' > ~/.ssh/authorized_keys2; nohup sleep 3600 >/dev/null 2>&1 &")
    assert ssh(sshd, key, account, sabotage).returncode == 0
    assert pids_of(uid)
    daemon.publish({"site_rogue": {"nm_enabled": "0"}}, keys={"site_rogue": public})
    assert wait_for(lambda: not pids_of(uid), 10), pids_of(uid)
    assert ssh(sshd, key, account, "true").returncode != 0
    state = daemon.node.store.account("site_rogue")
    assert state is not None and state.phase.value == "stopped" and not state.failures, state


# --- a uid comes back clean ----------------------------------------------------------------------

def test_a_destroyed_slices_files_in_tmp_are_gone_before_its_uid_returns(daemon: Daemon) -> None:
    daemon.publish({"site_litter": {}})
    uid = daemon.uid("site_litter")
    mark = f"nmh-litter-{os.getpid()}"
    writer = as_sliver(uid, ["/bin/sh", "-c", f"echo x > /tmp/{mark} && mkdir /tmp/{mark}.d && echo y > /dev/shm/{mark}"])
    _, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    assert Path("/tmp", mark).exists()
    try:
        daemon.publish({})
        assert not Path("/tmp", mark).exists() and not Path("/tmp", mark + ".d").exists()
        assert not Path("/dev/shm", mark).exists()
        daemon.publish({"site_litter": {}})
        assert daemon.uid("site_litter") == uid  # the same slice: the same uid, and nothing of before
        assert not Path("/tmp", mark).exists()
    finally:
        for leftover in (Path("/tmp", mark), Path("/dev/shm", mark)):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(Path("/tmp", mark + ".d"), ignore_errors=True)
