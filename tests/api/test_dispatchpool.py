"""The API's dispatch pool: as few threads as the calls need, never more than its cap, and a
blocked call does not hold up the calls queued behind it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from nodemanager.api.dispatchpool import DispatchPool


def run(scenario: Any) -> Any:
    return asyncio.run(scenario())


def test_short_calls_share_one_thread() -> None:
    async def scenario() -> tuple[list[int], int]:
        pool = DispatchPool(8, asyncio.get_running_loop(), stall=30.0)  # no helper on a slow machine
        try:
            results = await asyncio.gather(*(pool.run(lambda i=i: i * i) for i in range(200)))
            return list(results), pool.threads
        finally:
            pool.shutdown()

    results, threads = run(scenario)
    assert results == [i * i for i in range(200)]
    assert threads == 1  # nothing blocked: no second thread was ever needed


def test_a_blocked_worker_gets_a_helper() -> None:
    release = threading.Event()

    async def scenario() -> tuple[str, int]:
        pool = DispatchPool(4, asyncio.get_running_loop(), stall=0.01)
        try:
            blocked = pool.run(release.wait, 30)
            answer = await asyncio.wait_for(pool.run(lambda: "quick"), timeout=20)
            threads = pool.threads
            release.set()
            assert await blocked is True
            return answer, threads
        finally:
            release.set()
            pool.shutdown()

    answer, threads = run(scenario)
    assert answer == "quick"  # served while the first call was still blocked
    assert threads == 2


def test_never_more_threads_than_the_cap() -> None:
    release = threading.Event()

    async def scenario() -> tuple[int, list[bool]]:
        pool = DispatchPool(2, asyncio.get_running_loop(), stall=0.005)
        try:
            calls = [pool.run(release.wait, 30) for _ in range(5)]
            await asyncio.sleep(0.3)  # many stall periods: helpers are woken up to the cap only
            threads = pool.threads
            release.set()
            return threads, list(await asyncio.wait_for(asyncio.gather(*calls), timeout=20))
        finally:
            release.set()
            pool.shutdown()

    threads, results = run(scenario)
    assert threads == 2 and results == [True] * 5


def test_errors_are_delivered_and_callbacks_run_in_the_loop() -> None:
    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        pool = DispatchPool(2, loop)
        got: list[Any] = []
        done = loop.create_future()

        def callback(result: Any, error: BaseException | None) -> None:
            got.append((result, type(error).__name__ if error else None, threading.current_thread() is main))
            done.set_result(None)

        main = threading.current_thread()
        try:
            with pytest.raises(ZeroDivisionError):
                await pool.run(lambda: 1 / 0)
            pool.submit(lambda: 1 / 0, (), callback)
            await asyncio.wait_for(done, 20)
            return got
        finally:
            pool.shutdown()

    assert run(scenario) == [(None, "ZeroDivisionError", True)]


def test_no_work_after_shutdown() -> None:
    async def scenario() -> None:
        pool = DispatchPool(2, asyncio.get_running_loop())
        pool.shutdown()
        with pytest.raises(RuntimeError):
            pool.run(lambda: None)

    run(scenario)
