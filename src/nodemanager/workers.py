"""Per-sliver workers on a bounded pool.

The original node manager ran one thread per account and serialised everything with a global
lock. Here a fixed pool of ``slivers.workers`` threads serves per-sliver queues:

* at most one operation per sliver is in flight, so a sliver's operations never overlap;
* different slivers proceed in parallel, at most ``workers`` at a time;
* a newer job replaces the pending one of the same kind, or of a kind it names as coalescing with
  it (``Start`` and ``Stop`` replace each other: the latest wanted run state wins), and inherits
  its waiters, so a burst of updates or of alternating calls for one sliver costs one operation,
  not a backlog;
* the thread count is the pool size, whatever the number of slivers.

What a job *does* is not known here: jobs are callables supplied by the caller (``sync`` builds
them from the plan, the API from a request). Failures are reported through each job's
``Completion``; retry and backoff policy belong to the operations, which record them in the store.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .core.errors import PoolClosed

logger = logging.getLogger(__name__)


class Completion:
    """The outcome of one submitted job, waitable from any thread.

    A bare lock held until the job finishes: a full sync hands out one per sliver, and an
    ``Event`` (a condition variable and two locks) costs several times as much."""

    __slots__ = ("_lock", "_finished", "_error", "_result", "_callbacks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._finished = False
        self._error: BaseException | None = None
        self._result: Any = None
        self._callbacks: list[Callable[[Completion], None]] | None = None

    @classmethod
    def resolved(cls, result: Any = None, error: BaseException | None = None) -> Completion:
        """A Completion that has already finished (a job run inline by its submitter, as the
        fleet simulator's hollow nodes do: ``fleet.node.InlinePool``)."""
        completion = cls()
        completion._finish(result, error)
        return completion

    def _finish(self, result: Any, error: BaseException | None) -> None:
        with _CALLBACK_LOCK:  # a callback is either taken here or added after: never lost between
            if self._finished:
                return
            self._result, self._error = result, error
            self._finished = True
            callbacks, self._callbacks = self._callbacks, None
        self._lock.release()
        for callback in callbacks or ():
            _call_safely(callback, self)

    def add_done_callback(self, callback: Callable[[Completion], None]) -> None:
        """Call ``callback(self)`` once the job has finished: at once (in this thread) if it
        already has, else in the thread that finishes it. Lets a waiter (an API request) be told
        of the outcome without holding a thread for it. A raising callback is logged, not
        propagated: it must not break the worker that runs it."""
        with _CALLBACK_LOCK:
            if not self._finished:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        _call_safely(callback, self)

    def done(self) -> bool:
        return self._finished

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job ran; return its result or raise its exception.

        Raises ``TimeoutError`` if it has not finished within ``timeout`` seconds."""
        if not self._finished:
            if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                raise TimeoutError("operation still in progress")
            self._lock.release()
        if self._error is not None:
            raise self._error
        return self._result


#: Guards the hand-over between ``add_done_callback`` and ``_finish`` (held for a few
#: instructions: one lock for all completions).
_CALLBACK_LOCK = threading.Lock()


def _call_safely(callback: Callable[[Completion], None], completion: Completion) -> None:
    try:
        callback(completion)
    except Exception:  # noqa: BLE001 - a waiter's bug must not break the worker
        logger.exception("event=completion-callback-failed")


def _closed() -> PoolClosed:
    return PoolClosed("the node manager is shutting down; the operation was not run")


@dataclass
class _Job:
    kind: str
    run: Callable[[], Any]
    waiters: list[Completion] = field(default_factory=list)


@dataclass
class _SliverQueue:
    pending: deque[_Job] = field(default_factory=deque)
    active: bool = False
    current: str = ""


class WorkerPool:
    """Per-sliver serialised, cross-sliver parallel execution of jobs on ``workers`` threads."""

    def __init__(self, workers: int, *, name: str = "sliver-worker", start: bool = True) -> None:
        """``start=False`` builds the pool without its threads (the composition root builds
        without side effects); :meth:`start` starts them. Work submitted meanwhile waits."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._lock = threading.Lock()
        self._queues: dict[str, _SliverQueue] = {}
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self.workers = workers
        # Names of slivers whose next job may run now; each name is in here at most once.
        self._ready: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker threads (idempotent)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (name := self._ready.get()) is not None:
            self._run_one(name)

    def submit(
        self, name: str, kind: str, run: Callable[[], Any], *, replaces: frozenset[str] = frozenset()
    ) -> Completion:
        """Queue ``run`` for sliver ``name``; return its Completion.

        If the last pending (not yet started) job of this sliver has the same ``kind``, or a kind
        in ``replaces``, it is replaced by this one and its waiters will receive this job's
        outcome. A pool that is shutting down finishes the Completion with ``PoolClosed``.
        Thread-safe.
        """
        completion = Completion()
        with self._lock:
            if self._closed:
                completion._finish(None, _closed())
                return completion
            squeue = self._queues.setdefault(name, _SliverQueue())
            if squeue.pending and (squeue.pending[-1].kind == kind or squeue.pending[-1].kind in replaces):
                replaced = squeue.pending.pop()
                job = _Job(kind, run, replaced.waiters + [completion])
            else:
                job = _Job(kind, run, [completion])
            squeue.pending.append(job)
            if not squeue.active:
                squeue.active = True
                self._ready.put(name)
        return completion

    def _run_one(self, name: str) -> None:
        with self._lock:
            squeue = self._queues[name]
            job = squeue.pending.popleft()
            squeue.current = job.kind
            cancelled = self._closed
        result: Any = None
        error: BaseException | None = None
        if cancelled:
            error = _closed()
        else:
            try:
                result = job.run()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiters, never lost
                error = exc
        for waiter in job.waiters:
            waiter._finish(result, error)
        with self._lock:
            squeue.current = ""
            if squeue.pending and not self._closed:
                # Re-enqueue rather than loop, so one busy sliver cannot starve the others.
                self._ready.put(name)
            else:
                squeue.active = False
                for left in squeue.pending:
                    for waiter in left.waiters:
                        waiter._finish(None, _closed())
                squeue.pending.clear()
                del self._queues[name]
                self._idle.notify_all()

    def busy(self, name: str) -> bool:
        """True while ``name`` has a job running or pending."""
        with self._lock:
            return name in self._queues

    def depth(self) -> int:
        """Number of slivers with work running or pending (the queue depth metric)."""
        with self._lock:
            return len(self._queues)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no sliver has work; False if ``timeout`` expired first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queues, timeout)

    def shutdown(self, *, cancel_pending: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; let in-flight operations finish (they are never cut in half).

        With ``cancel_pending`` the jobs that have not started are dropped and their waiters told
        so; otherwise they run first."""
        if not self._started:  # no thread ever ran: fail whatever waits, nothing runs it
            with self._lock:
                self._closed = True
                for squeue in self._queues.values():
                    for job in squeue.pending:
                        for waiter in job.waiters:
                            waiter._finish(None, _closed())
                self._queues.clear()
            return
        with self._lock:
            if cancel_pending:
                self._closed = True
        if not cancel_pending:
            self.wait_idle(timeout)
            with self._lock:
                self._closed = True
        else:
            self.wait_idle(timeout)
        for _ in self._threads:
            self._ready.put(None)
        for thread in self._threads:
            thread.join(timeout)
