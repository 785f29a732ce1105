"""The API's bounded pool of dispatch threads, handing outcomes back to the event loop.

The methods may block (the store, a ticket's signature check), so the server's event loop runs
them here, on at most ``threads`` threads. Two things make the hop cheap, both measured with
``bench/api_bench.py`` (``api_server_cpu_us_per_call``, 16 clients, 2 cores):

* **as few threads as the calls need.** Waking a thread per call (``ThreadPoolExecutor``) with
  16 calls in flight puts 16 threads in a convoy on the GIL: 268 us of server CPU per call,
  against 117 us when one thread takes the calls one after the other. So a worker that finishes
  a call takes the next queued one without sleeping, and another worker is woken only when
  nobody is running, or when calls are queued and no worker has taken or finished one for
  :data:`STALL_SECONDS` (a worker is blocked: a slow store, a signature check). A blocking method therefore still never
  holds up the others by more than that, and at most ``threads`` run at once.
* **outcomes handed back in batches**: one loop wake-up for all the calls finished meanwhile
  (not ``loop.run_in_executor``, which wakes the loop once per call).

Threads are started on demand and are daemons: a call still running when the server stops is
abandoned and finishes alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["STALL_SECONDS", "DispatchPool"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: How long calls may stay queued with no worker taking or finishing one before one more worker
#: is woken.
STALL_SECONDS = 0.002

_Done = "asyncio.Future[Any] | Callable[[Any, BaseException | None], None]"
_Item = tuple[Any, Callable[..., Any], tuple[Any, ...]]


class DispatchPool:
    """At most ``threads`` dispatch threads serving one event loop (see the module doc).

    :meth:`run` and :meth:`shutdown` are called from the loop's thread (``shutdown`` also from
    the thread that stops the server); the functions run in the pool's threads.
    """

    def __init__(self, threads: int, loop: asyncio.AbstractEventLoop, *, name: str = "nm-api",
                 stall: float = STALL_SECONDS) -> None:
        if threads < 1:
            raise ValueError("a dispatch pool needs at least one thread")
        self._max = threads
        self._loop = loop
        self._name = name
        self._stall = stall
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: deque[_Item] = deque()
        self._threads = 0
        self._running = 0  # workers executing a call, or about to take the next one
        self._idle = 0     # workers waiting for work
        self._closed = False
        self._progress = 0.0  # time.monotonic() when a worker last took or finished a call
        self._watchdog: asyncio.TimerHandle | None = None
        self._finished: list[tuple[Any, Any, BaseException | None]] = []
        self._wake_pending = False

    @property
    def threads(self) -> int:
        """Worker threads started so far (at most ``threads``)."""
        return self._threads

    def run(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``function(*args)`` in a pool thread; a future of the loop settled with its
        result or exception. Loop thread only."""
        future: asyncio.Future[T] = self._loop.create_future()
        self.submit(function, args, future)
        return future

    def submit(self, function: Callable[..., Any], args: tuple[Any, ...],
               done: asyncio.Future[Any] | Callable[[Any, BaseException | None], None]) -> None:
        """Run ``function(*args)`` in a pool thread, then, in the loop's thread, settle the
        future ``done`` (unless it was cancelled meanwhile) or call ``done(result, error)``.
        Loop thread only."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the dispatch pool is shut down")
            self._queue.append((done, function, args))
            if self._running == 0:
                self._progress = time.monotonic()
                self._wake_one()
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._stall, self._check_stall)

    def shutdown(self) -> None:
        """Drop calls not started yet; running ones finish alone (their futures are abandoned)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._work.notify_all()

    # --- loop thread --------------------------------------------------------------------------
    def _check_stall(self) -> None:
        """Wake one more worker when calls are queued and no worker made progress lately."""
        self._watchdog = None
        with self._lock:
            if not self._queue or self._closed:
                return
            now = time.monotonic()
            if now - self._progress >= self._stall:
                self._progress = now
                self._wake_one()
        self._watchdog = self._loop.call_later(self._stall, self._check_stall)

    def _wake_one(self) -> None:
        """Get one more worker running (lock held): an idle one, else a new one (up to the cap)."""
        if self._idle:
            self._idle -= 1
            self._running += 1
            self._work.notify()
        elif self._threads < self._max:
            self._threads += 1
            self._running += 1
            thread = threading.Thread(target=self._worker, name=f"{self._name}-{self._threads}", daemon=True)
            thread.start()

    # --- pool threads -------------------------------------------------------------------------
    def _worker(self) -> None:
        lock = self._lock
        with lock:
            while True:
                if self._closed:
                    self._running -= 1
                    return
                if not self._queue:
                    self._running -= 1
                    self._idle += 1
                    self._work.wait()  # whoever notifies moves this worker back to running
                    continue
                done, function, args = self._queue.popleft()
                self._progress = time.monotonic()
                lock.release()
                try:
                    self._call(done, function, args)
                finally:
                    lock.acquire()

    def _call(self, done: Any, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = function(*args)
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting task
            error = exc
        with self._lock:
            self._progress = time.monotonic()
            self._finished.append((done, result, error))
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._hand_back)
            except RuntimeError:  # the loop is closed: the connection is gone anyway
                pass

    def _hand_back(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake_pending = False
        for done, result, error in finished:
            if not isinstance(done, asyncio.Future):
                try:
                    done(result, error)
                except Exception:  # noqa: BLE001 - one caller's bug must not lose the others' answers
                    logger.exception("event=api-dispatch-callback-error")
            elif done.done():
                continue  # the connection was cancelled meanwhile
            elif error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)
