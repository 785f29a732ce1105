"""One XML-RPC call, from request body to response body, for the server's event loop.

Kept apart from :mod:`.server` (sockets, HTTP framing, connections): this is where a request is
parsed, dispatched on the bounded pool, turned into a result or a Fault, and reported to the
metrics hook. A method that answers a :class:`~.deferred.Pending` (an operation on the sliver
workers) gives its dispatch thread back at once; the loop awaits the job's completion
(``Completion.add_done_callback`` -> ``loop.call_soon_threadsafe``) under an asyncio timer of
``Pending.timeout``, and a short second step in the pool builds the answer -- the job's outcome,
or Fault 104 "still in progress" when the timer fired first (the job goes on). So a caller
alternating Start and Stop holds no thread however long the operations take.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .deferred import Pending, still_in_progress
from .dispatchpool import DispatchPool
from .faults import to_fault
from .identity import PeerIdentity
from .wire import dump_fault, dump_response, parse_request

__all__ = ["CallRunner", "Dispatch", "OnRequest"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: ``dispatch(method, params, peer) -> result or Pending``; raises core.errors exceptions. Runs
#: in a pool thread (e.g. ``NodeManagerApi.dispatch_deferred``).
Dispatch = Callable[[str, tuple[Any, ...], PeerIdentity], Any]
#: ``on_request(method, fault_code or None, seconds)``; called from a pool thread after each call
#: (for a deferred call: once its outcome is known, the seconds counting the wait).
OnRequest = Callable[[str, int | None, float], None]


@dataclass(frozen=True, slots=True)
class _Deferred:
    """A dispatched call whose answer is a Pending (handed from a pool thread to the loop)."""

    pending: Pending
    method: str
    peer: PeerIdentity
    started: float


class CallRunner:
    """Answers request bodies with ``dispatch`` on ``pool``. :meth:`answer` runs in the loop."""

    def __init__(self, dispatch: Dispatch, pool: DispatchPool, on_request: OnRequest | None = None) -> None:
        self._dispatch = dispatch
        self._pool = pool
        self._on_request = on_request

    def shutdown(self) -> None:
        """Drop calls not started yet (see :meth:`DispatchPool.shutdown`)."""
        self._pool.shutdown()

    async def answer(self, body: bytes, peer: PeerIdentity) -> bytes:
        """The response body for one request body from ``peer``."""
        answer = await self._pool.run(self._call, body, peer)
        if isinstance(answer, bytes):
            return answer
        return await self._finished(answer)

    def begin(self, body: bytes, peer: PeerIdentity, future: asyncio.Future[T], wrap: Callable[[bytes], T]) -> None:
        """As :meth:`answer`, without a task: ``future`` gets ``wrap(response body)``. The
        cheap path for a call that waits for no slot (one loop callback, no coroutine)."""

        def dispatched(answer: bytes | _Deferred, error: BaseException | None) -> None:
            if future.done():
                return  # the client is gone
            if error is not None:
                future.set_exception(error)
            elif isinstance(answer, bytes):
                future.set_result(wrap(answer))
            else:
                task = asyncio.ensure_future(self._finished(answer))
                task.add_done_callback(lambda done: _pass_on(done, future, wrap))
                future.add_done_callback(lambda outer: task.cancel() if outer.cancelled() else None)

        self._pool.submit(self._call, (body, peer), dispatched)

    async def _finished(self, deferred: _Deferred) -> bytes:
        finished = await _settled(deferred.pending)
        return await self._pool.run(self._finish, deferred, finished)

    # --- pool threads ---------------------------------------------------------------------
    def _call(self, body: bytes, peer: PeerIdentity) -> bytes | _Deferred:
        """Parse, dispatch and serialise one request: the response body (a result or a Fault),
        or a :class:`_Deferred` when the method answered a Pending."""
        started = time.perf_counter()
        method = "?"
        try:
            method, params = parse_request(body)
            result = self._dispatch(method, params, peer)
            if isinstance(result, Pending):
                return _Deferred(result, method, peer, started)
            payload = dump_response(result)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a Fault (faults.to_fault)
            return self._fault(exc, method, peer, started)
        self._report(method, None, peer, started)
        return payload

    def _finish(self, deferred: _Deferred, finished: bool) -> bytes:
        """The response body of a deferred call once its job finished or its wait timed out."""
        pending = deferred.pending
        try:
            if not finished:
                raise still_in_progress(pending.what, pending.timeout)
            payload = dump_response(pending.outcome())
        except Exception as exc:  # noqa: BLE001 - as in _call
            return self._fault(exc, deferred.method, deferred.peer, deferred.started)
        self._report(deferred.method, None, deferred.peer, deferred.started)
        return payload

    def _fault(self, exc: Exception, method: str, peer: PeerIdentity, started: float) -> bytes:
        fault = to_fault(exc, method=method)
        self._report(method, fault.faultCode, peer, started)
        return dump_fault(fault)

    def _report(self, method: str, code: int | None, peer: PeerIdentity, started: float) -> None:
        elapsed = time.perf_counter() - started
        logger.debug("event=api-call method=%s uid=%s fault=%s seconds=%.6f", method, peer.uid, code, elapsed)
        if self._on_request is not None:
            try:
                self._on_request(method, code, elapsed)
            except Exception:  # a metrics hook must not break the call
                logger.exception("event=api-on-request-error")


async def _settled(pending: Pending) -> bool:
    """Wait for a Pending's job without a thread: True once it finished, False when its
    ``timeout`` ran out first."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake(_completion: object) -> None:  # in the worker thread that finished the job
        try:
            loop.call_soon_threadsafe(_settle, done)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    pending.completion.add_done_callback(wake)
    try:
        async with asyncio.timeout(pending.timeout):
            await done
    except TimeoutError:
        return pending.completion.done()
    return True


def _pass_on(task: asyncio.Future[bytes], future: asyncio.Future[T], wrap: Callable[[bytes], T]) -> None:
    if future.done():
        return
    if task.cancelled():
        future.cancel()
    elif (error := task.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(wrap(task.result()))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
