"""Deferred answers: a method that returns a Pending is answered once its worker job finishes,
without holding a dispatch thread meanwhile (api/deferred.py, api/calls.py), on a real server.

The jobs run on a real WorkerPool and block on events the tests set; the dispatch is a small
fake that answers ``op(seconds_to_wait_for_release, outcome)`` with a Pending.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemanager.api.deferred import Pending, resolve, still_in_progress
from nodemanager.api.fairness import CallerLimits
from nodemanager.api.identity import PeerIdentity
from nodemanager.api.server import ApiServer
from nodemanager.core import errors
from nodemanager.workers import WorkerPool


class Jobs:
    """A dispatch answering ``op(timeout, outcome)`` with a Pending of a job that waits for
    ``release`` and then returns ``outcome`` (or raises the ``core.errors`` class it names)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.release = threading.Event()
        self.ran = 0
        self.lock = threading.Lock()

    def job(self, outcome: str) -> Any:
        assert self.release.wait(30)
        with self.lock:
            self.ran += 1
        if hasattr(errors, outcome):
            raise getattr(errors, outcome)(f"the job raised {outcome}")
        return outcome

    def __call__(self, method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
        if method == "op":
            timeout, outcome = params
            completion = self.pool.submit(f"s{threading.get_ident()}{time.monotonic_ns()}", "op",
                                          lambda: self.job(outcome))
            return Pending(completion, f"op({outcome})", float(timeout), lambda result: f"done: {result}")
        if method == "echo":
            return list(params)
        raise errors.UnknownMethod(method)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    workers = WorkerPool(8)
    yield workers
    workers.shutdown(timeout=10)


@pytest.fixture
def jobs(pool: WorkerPool) -> Iterator[Jobs]:
    fake = Jobs(pool)
    yield fake
    fake.release.set()


@pytest.fixture
def make_server(jobs: Jobs) -> Iterator[Callable[..., ApiServer]]:
    directory = Path(tempfile.mkdtemp(prefix="nma-"))
    servers: list[ApiServer] = []

    def make(**options: Any) -> ApiServer:
        server = ApiServer(jobs, tcp="127.0.0.1:0", unix_socket=str(directory / f"api{len(servers)}.sock"),
                           **options)
        servers.append(server)
        server.start()
        return server

    yield make
    jobs.release.set()
    for server in servers:
        server.stop(grace=1.0)
    shutil.rmtree(directory, ignore_errors=True)


def proxy(server: ApiServer) -> xmlrpc.client.ServerProxy:
    assert server.tcp_address is not None
    return xmlrpc.client.ServerProxy("http://{}:{}/".format(*server.tcp_address))


def call_op(server: ApiServer, timeout: float, outcome: str) -> Any:
    with proxy(server) as client:
        return client.op(timeout, outcome)


def in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(function())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


# --- Pending on its own ------------------------------------------------------------------------
def test_pending_wait_resolves_through_finish(pool: WorkerPool) -> None:
    pending = Pending(pool.submit("a", "op", lambda: 20), "op(a)", 5.0, lambda result: result + 1)
    assert pending.wait() == 21
    assert resolve(pending) == 21
    assert resolve("plain") == "plain"


def test_pending_wait_raises_the_jobs_error(pool: WorkerPool) -> None:
    def fail() -> None:
        raise errors.BackendError("sliver a: it broke")

    pending = Pending(pool.submit("a", "op", fail), "op(a)", 5.0)
    with pytest.raises(errors.BackendError, match="it broke"):
        pending.wait()


def test_pending_wait_times_out_as_still_in_progress(pool: WorkerPool) -> None:
    release = threading.Event()
    pending = Pending(pool.submit("a", "op", lambda: release.wait(10)), "Stop(a)", 0.05)
    with pytest.raises(errors.OperationFailed) as caught:
        pending.wait()
    assert str(caught.value) == "Stop(a) is still in progress after 0.05 s; it continues in the background"
    assert str(caught.value) == str(still_in_progress("Stop(a)", 0.05))
    release.set()
    assert pool.wait_idle(10)


def test_a_job_that_itself_times_out_is_not_reworded(pool: WorkerPool) -> None:
    def slow() -> None:
        raise TimeoutError("the backend's own timeout")

    pending = Pending(pool.submit("a", "op", slow), "op(a)", 5.0)
    assert pool.wait_idle(10)
    with pytest.raises(TimeoutError, match="the backend's own timeout"):
        pending.wait()


# --- through the server -------------------------------------------------------------------------
def test_a_deferred_call_answers_the_jobs_outcome(make_server: Callable[..., ApiServer], jobs: Jobs) -> None:
    seen: list[tuple[str, int | None, float]] = []
    server = make_server(on_request=lambda m, c, s: seen.append((m, c, s)))
    jobs.release.set()
    with proxy(server) as client:
        assert client.op(5, "fine") == "done: fine"
        with pytest.raises(xmlrpc.client.Fault) as caught:
            client.op(5, "BackendError")
        assert (caught.value.faultCode, caught.value.faultString) == (104, "the job raised BackendError")
        with pytest.raises(xmlrpc.client.Fault) as caught:
            client.op(5, "InvalidArgument")
        assert caught.value.faultCode == 102
        assert client.echo(1) == [1]  # the connection stays usable
    assert [(m, c) for m, c, _ in seen] == [("op", None), ("op", 104), ("op", 102), ("echo", None)]


def test_timeout_answers_104_and_the_job_goes_on(make_server: Callable[..., ApiServer], jobs: Jobs) -> None:
    seen: list[tuple[str, int | None, float]] = []
    server = make_server(on_request=lambda m, c, s: seen.append((m, c, s)))
    with proxy(server) as client:
        with pytest.raises(xmlrpc.client.Fault) as caught:
            client.op(0.2, "late")
    assert caught.value.faultCode == 104
    assert caught.value.faultString == "op(late) is still in progress after 0.2 s; it continues in the background"
    assert len(seen) == 1 and seen[0][:2] == ("op", 104) and seen[0][2] >= 0.2  # the wait counts
    assert jobs.ran == 0
    jobs.release.set()
    assert jobs.pool.wait_idle(10)
    assert jobs.ran == 1


def test_waiting_calls_hold_no_dispatch_thread(make_server: Callable[..., ApiServer], jobs: Jobs) -> None:
    """Two dispatch threads, six calls waiting on their jobs: another call is still answered."""
    server = make_server(dispatch_threads=2)
    waiting = [in_thread(lambda: call_op(server, 30, "later")) for _ in range(6)]
    try:
        deadline = time.monotonic() + 10
        while jobs.pool.depth() < 6:  # every job is queued: every call got past its dispatch
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with proxy(server) as client:
            assert client.echo("still here") == ["still here"]
    finally:
        jobs.release.set()
        for thread, _ in waiting:
            thread.join(30)
    assert [box for _, box in waiting] == [["done: later"]] * 6


def test_stop_cuts_a_waiting_call_after_the_grace(make_server: Callable[..., ApiServer], jobs: Jobs) -> None:
    server = make_server()
    thread, box = in_thread(lambda: call_op(server, 30, "never"))
    deadline = time.monotonic() + 10
    while jobs.pool.depth() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    server.stop(grace=0.3)
    thread.join(10)
    assert time.monotonic() - started < 5
    assert box and isinstance(box[0], Exception)  # cut, not answered
    jobs.release.set()  # the job finishing afterwards (its loop closed) must not break anything
    assert jobs.pool.wait_idle(10)


# --- the per-caller limits on their own --------------------------------------------------------
def test_caller_limits_count_connections_per_uid() -> None:
    limits = CallerLimits(max_connections=2, max_calls=3)
    assert limits.admit(1000) and limits.admit(1000)
    assert not limits.admit(1000)  # its third
    assert limits.admit(1001)  # another uid
    assert limits.admit(None) and limits.admit(None) and not limits.admit(None)  # anonymous: one bucket
    assert all(limits.admit(0) for _ in range(100))  # root is exempt
    assert limits.connections(1000) == 2 and limits.connections(0) == 0
    limits.release(1000)
    assert limits.admit(1000)
    for _ in range(2):
        limits.release(1000)
    assert limits.connections(1000) == 0
    assert limits.admit(1000)
    with pytest.raises(ValueError):
        CallerLimits(max_connections=0)


def test_caller_limits_call_slots() -> None:
    limits = CallerLimits(max_connections=5, max_calls=3)
    assert limits.call_slots(0) is None
    limits.admit(1000)
    limits.admit(1000)
    slots = limits.call_slots(1000)
    assert slots is not None and slots is limits.call_slots(1000)  # shared by the uid's connections
    limits.admit(1001)
    assert limits.call_slots(1001) is not slots

    async def take_all() -> bool:
        for _ in range(3):
            await slots.acquire()
        return slots.locked()

    import asyncio

    assert asyncio.run(take_all())
