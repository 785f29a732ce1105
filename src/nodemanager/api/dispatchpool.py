"""The API's bounded pool of dispatch threads, handing outcomes back to the event loop.

The methods may block (the store, a ticket's signature check), so the server's event loop runs
them here, on a fixed number of threads. Not ``loop.run_in_executor``: outcomes are handed back
in batches, one loop wake-up for all the calls finished meanwhile, which halves the per-call cost
under load.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["DispatchPool"]

T = TypeVar("T")


class DispatchPool:
    """``threads`` dispatch threads serving one event loop.

    :meth:`run` is called from the loop's thread; the functions run in the pool's threads.
    """

    def __init__(self, threads: int, loop: asyncio.AbstractEventLoop, *, name: str = "nm-api") -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._loop = loop
        self._lock = threading.Lock()
        self._finished: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._wake_pending = False

    def run(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``function(*args)`` in a pool thread; a future of the loop settled with its
        result or exception. Loop thread only."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._executor.submit(self._run_and_hand_back, future, function, args)
        return future

    def shutdown(self) -> None:
        """Drop calls not started yet; running ones finish alone (their futures are abandoned)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run_and_hand_back(
        self, future: asyncio.Future[Any], function: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = function(*args)
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting task
            error = exc
        with self._lock:
            self._finished.append((future, result, error))
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
        for future, result, error in finished:
            if future.done():
                continue  # the connection was cancelled meanwhile
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
