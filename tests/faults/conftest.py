"""Fault-suite fixtures: a real daemon loop, a misbehaving HTTP authority, an API hammer.

* :class:`FaultyAuthority` -- a local HTTP server serving ``slices.xml`` whose behaviour a test
  switches between a good document and the faults of issue 6 (down, slow, 500, truncated, huge,
  wrong node, empty). "Down" really closes the listening socket (connection refused) and "up"
  binds the same port again.
* :class:`RunningNode` -- ``Node.run()`` (the daemon's real poll loop) in a thread with the
  hollow backend, the API on a Unix socket (``api.tcp = ""``) and a real ``AuthorityClient``
  (short timeout, one retry, no back-off sleeps). :meth:`RunningNode.cycle` wakes the loop and
  waits for the cycle it triggered.
* :class:`ApiHammer` -- a thread calling ``GetXIDs`` in a loop, counting answers and failures.

Socket paths live in a short directory under the system temp dir: pytest's ``tmp_path`` can
exceed the 107-byte limit of a Unix socket path.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodemanager.api.client import local_proxy
from nodemanager.authority.client import AuthorityClient
from nodemanager.config import Config, parse_config
from nodemanager.core.records import AccountState, Sliver
from nodemanager.daemon import Node, build_node
from nodemanager.sync import SyncOutcome
from nodemanager.testing.fakeauthority import stable_slice_id

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFaultSuiteKey{:029d} f@t"
DOC_CAP_BYTES = 256 * 1024


def slices_xml(names: list[str], timestamp: int, *, node_id: int = 1, expires: int | None = None,
               pad: int = 0) -> bytes:
    """A slices.xml document for ``names`` (``pad`` bytes of extra attributes per slice)."""
    expires = expires or int(time.time()) + 86400
    parts = [f'<slices timestamp="{timestamp}" node_id="{node_id}">']
    for i, name in enumerate(names):
        parts.append(
            f'<slice name="{name}" id="{stable_slice_id(name)}" instantiation="plc-instantiated" expires="{expires}">'
            f'<key type="ssh">{KEY.format(i)}</key>'
            f'<attribute name="nm_cpu_share" value="{1 + i % 4}"/>'
            + (f'<attribute name="padding" value="{"x" * pad}"/>' if pad else "")
            + "</slice>"
        )
    parts.append("</slices>")
    return "".join(parts).encode()


@dataclass
class Behaviour:
    """What the authority answers: ``body`` with ``status``, after ``delay`` seconds; without a
    Content-Length header when ``stream`` (close-delimited, so the cap is hit while reading)."""

    body: bytes = b""
    status: int = 200
    delay: float = 0.0
    stream: bool = False


class FaultyAuthority:
    """A slices.xml server whose answer (:attr:`behaviour`) tests change between cycles."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.requests = 0
        self.release = threading.Event()  # ends a "slow" answer early at teardown
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slices.xml"

    def serve(self, body: bytes, **kwargs: Any) -> None:
        self.behaviour = Behaviour(body=body, **kwargs)

    def up(self) -> None:
        if self._server is not None:
            return
        authority = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                authority.requests += 1
                behaviour = authority.behaviour
                if behaviour.delay:
                    authority.release.wait(behaviour.delay)
                try:
                    self.send_response(behaviour.status)
                    self.send_header("Content-Type", "text/xml")
                    if not behaviour.stream:
                        self.send_header("Content-Length", str(len(behaviour.body)))
                    self.end_headers()
                    view = memoryview(behaviour.body)
                    for start in range(0, len(view), 65536):
                        self.wfile.write(view[start:start + 65536])
                except OSError:
                    pass  # the client gave up (timeout, cap): that is the point of the fault

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Close the listener: the node now gets "connection refused"."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)


class ApiHammer:
    """Calls ``GetXIDs`` over the Unix socket in a loop until stopped; counts what happened."""

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.answers = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with local_proxy(self.socket_path, timeout=self.timeout) as proxy:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    result = proxy.GetXIDs()
                    if not isinstance(result, dict):
                        raise TypeError(f"GetXIDs returned {type(result).__name__}")
                    self.answers += 1
                except (OSError, xmlrpc.client.Error, TypeError) as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - started)
                time.sleep(0.01)

    def wait_answers(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` calls have been answered in total."""
        deadline = time.monotonic() + timeout
        while self.answers < count and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.005)
        return self.answers >= count

    def __enter__(self) -> ApiHammer:
        """Start, and return once the first call has been answered (so calls overlap what
        follows)."""
        self._thread.start()
        assert self.wait_answers(1), f"the API never answered: {self.failures[:3]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)


@dataclass
class Snapshot:
    """What must not change under a fault: records, account states, what the backend holds."""

    slivers: dict[str, Sliver]
    accounts: dict[str, AccountState]
    observed: dict[str, Any] = field(default_factory=dict)


class RunningNode:
    """The daemon's real loop in a thread (see the module docstring)."""

    def __init__(self, config: Config, client: AuthorityClient) -> None:
        self.config = config
        self.client = client
        self.manager = build_node(config, fetch=client.fetch)
        self._outcomes: list[SyncOutcome] = []
        self._changed = threading.Condition()
        self.manager.on_sync.append(self._record)
        self._thread = threading.Thread(target=self.manager.run, name="nm-loop", daemon=True)
        self.started = False

    def _record(self, outcome: SyncOutcome) -> None:
        with self._changed:
            self._outcomes.append(outcome)
            self._changed.notify_all()

    @property
    def socket_path(self) -> Path:
        return Path(self.config.api.unix_socket)

    def start(self) -> SyncOutcome:
        """Start the loop and return its first cycle's outcome (the loop polls at start), once
        the work it handed out is done."""
        self.started = True
        self._thread.start()
        outcome = self._wait(0)
        assert self.manager.pool.wait_idle(30)
        return outcome

    def _wait(self, seen: int, timeout: float = 30.0) -> SyncOutcome:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self._outcomes) > seen, timeout), "no sync cycle ran"
            return self._outcomes[seen]

    def cycle(self, timeout: float = 30.0) -> SyncOutcome:
        """Wake the loop (as ``nodemanager sync`` does) and wait for that cycle's outcome; then
        wait until the work it handed out is done."""
        with self._changed:
            seen = len(self._outcomes)
        self.manager.poll_now()
        outcome = self._wait(seen, timeout)
        assert self.manager.pool.wait_idle(timeout)
        return outcome

    def trigger(self) -> None:
        """Wake the loop without waiting for anything (for cycles that raise)."""
        self.manager.poll_now()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> Snapshot:
        backend = self.manager.backend
        return Snapshot(self.manager.store.slivers(), self.manager.store.accounts(), dict(backend.observe()))

    def metric(self, name: str, **labels: str) -> float | None:
        text = self.manager.metrics.render().decode()
        wanted = tuple(sorted(labels.items()))
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and tuple(sorted(sample.labels.items())) == wanted:
                    return sample.value
        return None

    def wait_metric(self, name: str, at_least: float, timeout: float = 30.0, **labels: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.metric(name, **labels) or 0) >= at_least:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.manager.stop()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the daemon loop did not stop"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nmf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def authority() -> Iterator[FaultyAuthority]:
    server = FaultyAuthority()
    server.up()
    yield server
    server.release.set()
    server.down()


def node_config(data_dir: Path, socket_dir: Path, **slivers: Any) -> Config:
    return parse_config({
        "node": {"data_dir": str(data_dir), "log_file": ""},
        "authority": {"poll_interval": 3600, "poll_jitter": 0, "timeout": 1},
        "api": {"tcp": "", "unix_socket": str(socket_dir / "api.sock")},
        "metrics": {"listen": ""},
        "slivers": {"backend": "hollow", **slivers},
        "enforce": {"cpu": False, "memory": False, "bandwidth": False, "disk": False},
    })


def authority_client(url: str, node_id: int = 1) -> AuthorityClient:
    return AuthorityClient(url=url, node_id=node_id, node_key=None, session=None, ca_file=None,
                           timeout=1.0, max_bytes=DOC_CAP_BYTES, retries=1, sleep=lambda s: None)


@pytest.fixture
def make_node(short_dir: Path) -> Iterator[Callable[..., RunningNode]]:
    nodes: list[RunningNode] = []

    def make(url: str, *, data_dir: Path | None = None) -> RunningNode:
        config = node_config(data_dir or short_dir / "data", short_dir)
        node = RunningNode(config, authority_client(url))
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.alive():
            node.stop()
        elif not node.started:
            node.manager.close()
