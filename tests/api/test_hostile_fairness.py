"""One sliver must not starve the API (issue 10, item 7), tried as hostile callers would.

Callers are real processes with real uids (``setpriv`` to a numeric uid, ``/usr/bin/python3``;
no account is created), so the server tells them apart from the kernel exactly as in
production. The methods are the real ``NodeManagerApi`` on a real ``WorkerPool``; only the
operations are a fake whose Start and Stop block until released (a sliver that ignores TERM).
The promises: a caller's connections beyond its cap are refused with 503 while others still get
in; its calls beyond its cap wait without a thread while others are answered; operations waiting
on the workers hold no dispatch thread; alternating Start/Stop coalesce.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodemanager.api.fairness import MAX_CALLS_PER_UID, MAX_CONNECTIONS_PER_UID
from nodemanager.api.identity import PeerIdentity
from nodemanager.api.methods import NodeManagerApi, caller_resolver
from nodemanager.api.server import ApiServer
from nodemanager.core.errors import UnknownMethod
from nodemanager.core.records import PLC_INSTANTIATED, AccountState, Phase, Sliver
from nodemanager.store import Store
from nodemanager.testing.rawhttp import read_response
from nodemanager.workers import WorkerPool

IS_ROOT = os.geteuid() == 0
SYSTEM_PYTHON = "/usr/bin/python3"
HOSTILE_UID, OTHER_UID = 64001, 64002   # numeric only: no account needed
HOSTILE, OTHER = "site_hostile", "site_other"
PROMPT = 10.0  # a generous bound on "answered promptly"

NEEDS_ROOT = (
    pytest.mark.root,
    pytest.mark.skipif(not IS_ROOT, reason="needs root (runs callers as other uids)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
)


def root_only(test: Callable[..., None]) -> Callable[..., None]:
    for mark in reversed(NEEDS_ROOT):
        test = mark(test)
    return test


# A caller: ``CLIENT SOCKET MODE COUNT METHOD ARGS_JSON``, printing one JSON line.
#   hold:   COUNT connections, one call on each, answered in turn and kept open until stdin
#           closes; prints {"results": [...]} as soon as all are answered;
#   listen: one connection that sends nothing and reads what the server says (a refused
#           connection is answered at once); prints {"results": [status]};
#   burst:  COUNT connections; the call sent on each the server has not refused (a refused one
#           is answered at once: those are read, not written to), then every answer read;
#           prints {"results": [...]}.
# An answer reads as its result, "fault N", the HTTP status when it is not 200, or "reset".
CLIENT = r"""
import json, select, socket, sys, time, xmlrpc.client
path, mode, count, method, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
args = tuple(json.loads(args))
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(path)
    return s
def send(s):
    body = xmlrpc.client.dumps(args, method).encode()
    s.sendall(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
def read(s):
    try:
        return read_answer(s)
    except ConnectionResetError:
        return "reset"
def read_answer(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return "closed"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status != 200:
        return status
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += s.recv(65536)
    try:
        return xmlrpc.client.loads(rest[:length])[0][0]
    except xmlrpc.client.Fault as fault:
        return "fault %d" % fault.faultCode
if mode == "hold":
    socks, results = [], []
    for _ in range(count):
        socks.append(connect())
        send(socks[-1])
        results.append(read(socks[-1]))
    print(json.dumps({"results": results}), flush=True)
    sys.stdin.read()
elif mode == "listen":
    print(json.dumps({"results": [read(connect())]}), flush=True)
else:
    socks = [connect() for _ in range(count)]
    time.sleep(0.5)
    refused, _, _ = select.select(socks, [], [], 0)
    for s in socks:
        if s not in refused:
            try:
                send(s)
            except OSError:
                pass
    print(json.dumps({"results": [read(s) for s in socks]}), flush=True)
"""


@dataclass
class Caller:
    """A client process running as another uid."""

    proc: subprocess.Popen[str]

    def results(self, timeout: float = 120) -> list[Any]:
        """The caller's answers (its one line of output)."""
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline() if self.proc.stdout else ""))
        reader.start()
        reader.join(timeout)
        assert box and box[0], "the caller printed nothing in time"
        return list(json.loads(box[0])["results"])

    def let_go(self) -> None:
        """Close the caller's stdin: a holding caller then closes its connections and exits."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture
def run_as() -> Iterator[Callable[..., Caller]]:
    """Start callers as other uids; every one is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(uid: int, socket_path: Path | None, mode: str, count: int, method: str, *args: Any) -> Caller:
        assert socket_path is not None
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON, "-c", CLIENT,
             str(socket_path), mode, str(count), method, json.dumps(list(args))],
            cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        procs.append(proc)
        return Caller(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nma-"))
    os.chmod(path, 0o755)  # the callers must reach the socket
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def call(server: ApiServer, method: str, *args: Any, timeout: float = PROMPT) -> Any:
    """One call as the test process itself, on a connection of its own (result or Fault)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        sock.connect(str(server.unix_path))
        body = xmlrpc.client.dumps(args, method).encode()
        sock.sendall(f"POST / HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status, _, payload = read_response(sock)
    assert status == 200, status
    try:
        return xmlrpc.client.loads(payload)[0][0]
    except xmlrpc.client.Fault as fault:
        return fault


def wait_for(condition: Callable[[], bool], what: str, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- per-uid connection cap ------------------------------------------------------------------
def whoami(method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
    if method == "whoami":
        return -1 if peer.uid is None else peer.uid
    raise UnknownMethod(method)


@root_only
def test_a_uids_connections_beyond_its_cap_get_503_while_another_uid_connects(
    sock_dir: Path, run_as: Callable[..., Caller]
) -> None:
    with ApiServer(whoami, tcp="", unix_socket=str(sock_dir / "api.sock")) as server:
        hostile = run_as(HOSTILE_UID, server.unix_path, "hold", MAX_CONNECTIONS_PER_UID, "whoami")
        assert hostile.results() == [HOSTILE_UID] * MAX_CONNECTIONS_PER_UID
        # all of them held open: one more of that uid is refused at once ...
        assert run_as(HOSTILE_UID, server.unix_path, "listen", 1, "whoami").results() == [503]
        # ... while another uid, and root, still get in
        assert run_as(OTHER_UID, server.unix_path, "burst", 3, "whoami").results() == [OTHER_UID] * 3
        assert call(server, "whoami") == 0
        hostile.let_go()
        # once its connections are closed, that uid gets in again
        wait_for(lambda: run_as(HOSTILE_UID, server.unix_path, "burst", 1, "whoami").results() == [HOSTILE_UID],
                 "the hostile uid's connections to be released")


# --- per-uid calls in flight ------------------------------------------------------------------
class BlockingDispatch:
    """``block`` waits until released and records how many of each uid's calls run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running: dict[int | None, int] = {}
        self.most: dict[int | None, int] = {}

    def __call__(self, method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
        if method == "whoami":
            return whoami(method, params, peer)
        if method != "block":
            raise UnknownMethod(method)
        with self.lock:
            self.running[peer.uid] = self.running.get(peer.uid, 0) + 1
            self.most[peer.uid] = max(self.most.get(peer.uid, 0), self.running[peer.uid])
        try:
            assert self.release.wait(60)
        finally:
            with self.lock:
                self.running[peer.uid] -= 1
        return 1

    def now(self, uid: int | None) -> int:
        with self.lock:
            return self.running.get(uid, 0)


@root_only
def test_a_uids_calls_beyond_its_cap_wait_while_another_uid_is_answered(
    sock_dir: Path, run_as: Callable[..., Caller]
) -> None:
    dispatch = BlockingDispatch()
    with ApiServer(dispatch, tcp="", unix_socket=str(sock_dir / "api.sock")) as server:
        try:
            hostile = run_as(HOSTILE_UID, server.unix_path, "burst", 12, "block")
            wait_for(lambda: dispatch.now(HOSTILE_UID) == MAX_CALLS_PER_UID, "the hostile calls to run")
            time.sleep(0.3)  # give any call beyond the cap the chance to (wrongly) start
            assert dispatch.now(HOSTILE_UID) == MAX_CALLS_PER_UID
            # 8 of its calls wait, 4 hold threads: the other 12 threads serve everyone else
            assert run_as(OTHER_UID, server.unix_path, "burst", 8, "whoami").results(PROMPT) == [OTHER_UID] * 8
            assert call(server, "whoami") == 0
        finally:
            dispatch.release.set()
        assert hostile.results() == [1] * 12  # every waiting call was served in its turn
    assert dispatch.most[HOSTILE_UID] == MAX_CALLS_PER_UID


# --- operations hold no thread; Start/Stop coalesce ------------------------------------------
class BlockingOperations:
    """The operations port as the API uses it; start and stop block until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.ran: list[tuple[str, str]] = []

    def _run(self, kind: str, name: str) -> None:
        with self.lock:
            self.ran.append((kind, name))
        assert self.release.wait(60), "never released"

    def start(self, name: str) -> None:
        self._run("start", name)

    def stop(self, name: str) -> None:
        self._run("stop", name)

    def count(self) -> int:
        with self.lock:
            return len(self.ran)


def sliver(name: str, slice_id: int) -> Sliver:
    return Sliver(name=name, slice_id=slice_id, instantiation=PLC_INSTANTIATED, expires=2**31 - 1,
                  timestamp=1, attributes=(("nm_cpu_share", str(slice_id)),))


@dataclass
class Node:
    server: ApiServer
    ops: BlockingOperations
    #: Calls whose dispatch has returned, i.e. given its dispatch thread back (a list: shared).
    returned: list[int] = field(default_factory=lambda: [0])


@pytest.fixture
def make_node(sock_dir: Path) -> Iterator[Callable[..., Node]]:
    """The real methods on a real store and worker pool, behind a real server (started)."""
    cleanup: list[Callable[[], None]] = []

    def make(**server_options: Any) -> Node:
        store = Store(sock_dir / "nm.db")
        cleanup.append(store.close)
        store.apply_records([sliver(HOSTILE, 1), sliver(OTHER, 2)], [])
        for name, uid in ((HOSTILE, HOSTILE_UID), (OTHER, OTHER_UID)):
            store.put_account(AccountState(name=name, uid=uid, owned=True, phase=Phase.RUNNING))
        ops = BlockingOperations()
        cleanup.insert(0, ops.release.set)
        pool = WorkerPool(2)
        cleanup.append(lambda: pool.shutdown(timeout=30))
        api = NodeManagerApi(store=store, pool=pool, operations=ops,  # type: ignore[arg-type]
                             resolve_caller=caller_resolver(store, lambda uid: object()), operation_timeout=60)
        returned = [0]

        def counting(method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
            answer = api.dispatch_deferred(method, params, peer)
            if method in ("Start", "Stop"):
                with ops.lock:
                    returned[0] += 1
            return answer

        server = ApiServer(counting, tcp="", unix_socket=str(sock_dir / "api.sock"), **server_options)
        server.start()
        cleanup.insert(0, lambda: server.stop(grace=1.0))
        return Node(server, ops, returned)

    yield make
    for step in cleanup:
        step()


def test_pending_operations_hold_no_dispatch_thread(make_node: Callable[..., Node]) -> None:
    """64 Start/Stop calls waiting on a blocked operation, 16 dispatch threads: Help, GetRSpec
    and the rest are still answered; when released, every call is answered and the 64
    alternating calls cost two operations (the running one and the one pending)."""
    calls = 64
    # per-uid caps lifted: this test runs as any uid and is about threads, not caps
    node = make_node(dispatch_threads=16, max_connections_per_uid=1000, max_calls_per_uid=1000)
    answers: list[Any] = []
    lock = threading.Lock()

    def alternate(i: int) -> None:
        answer = call(node.server, "Start" if i % 2 else "Stop", HOSTILE, timeout=120)
        with lock:
            answers.append(answer)

    callers = [threading.Thread(target=alternate, args=(i,)) for i in range(calls)]
    try:
        for thread in callers:
            thread.start()
        wait_for(lambda: node.returned[0] == calls, "every call's dispatch thread to be given back")
        assert node.ops.count() == 1  # one operation runs (blocked); the rest wait for it
        started = time.monotonic()
        assert "Help()" in call(node.server, "Help")
        assert call(node.server, "GetRSpec", OTHER)["nm_cpu_share"] == 2
        assert call(node.server, "GetXIDs") == {HOSTILE: HOSTILE_UID, OTHER: OTHER_UID}
        assert time.monotonic() - started < PROMPT
        assert answers == []  # all of them still pending meanwhile
    finally:
        node.ops.release.set()
        for thread in callers:
            thread.join(60)
    assert answers == [1] * calls
    assert node.ops.count() == 2  # Start and Stop coalesced: latest wins


@root_only
def test_alternating_start_stop_from_many_connections_cannot_delay_another_uids_calls(
    make_node: Callable[..., Node], run_as: Callable[..., Caller]
) -> None:
    """The hostile sliver (its own uid, allowed to Start/Stop itself) floods its Start/Stop
    from more connections than its cap while its operations hang; another sliver's GetRSpec
    calls are all answered meanwhile."""
    node = make_node()
    path = node.server.unix_path
    flood = [run_as(HOSTILE_UID, path, "burst", 20, method, HOSTILE) for method in ("Start", "Stop")]
    try:
        wait_for(lambda: node.returned[0] == MAX_CALLS_PER_UID, "the hostile calls to be dispatched")
        time.sleep(0.3)
        assert node.returned[0] == MAX_CALLS_PER_UID  # the rest wait their turn, in the loop
        other = run_as(OTHER_UID, path, "burst", 8, "GetRSpec", OTHER).results(PROMPT)
        assert [answer["nm_cpu_share"] for answer in other] == [2] * 8
        assert call(node.server, "Help")  # and root, too
        assert node.ops.count() == 1  # still blocked: the answers above came while it hung
    finally:
        node.ops.release.set()
    results = [answer for caller in flood for answer in caller.results()]
    assert results.count(1) == MAX_CONNECTIONS_PER_UID  # its connections beyond 32 were refused
    assert set(results) <= {1, 503, "reset"} and results.count(503) > 0
    # coalesced: the first four calls, at least, cost two operations
    assert node.ops.count() <= MAX_CONNECTIONS_PER_UID - 2
