"""Per-sliver workers: no overlap per sliver, bounded parallelism, latest-wins coalescing."""

from __future__ import annotations

import threading

import pytest

from nodemanager.core.errors import PoolClosed
from nodemanager.workers import WorkerPool


@pytest.fixture
def pool():
    pool = WorkerPool(2)
    yield pool
    pool.shutdown(cancel_pending=True, timeout=5)


def test_one_sliver_operations_never_overlap(pool: WorkerPool) -> None:
    release = threading.Event()
    started = threading.Event()
    active = []
    overlaps = []
    lock = threading.Lock()

    def op(tag: str):
        def run() -> str:
            with lock:
                active.append(tag)
                if len(active) > 1:
                    overlaps.append(tuple(active))
            started.set()
            release.wait(5)
            with lock:
                active.remove(tag)
            return tag
        return run

    first = pool.submit("site_a", "start", op("first"))
    assert started.wait(5)
    second = pool.submit("site_a", "stop", op("second"))
    # The second operation is held while the first is in flight.
    with pytest.raises(TimeoutError):
        second.wait(0.2)
    release.set()
    assert first.wait(5) == "first"
    assert second.wait(5) == "second"
    assert overlaps == []


def test_different_slivers_run_in_parallel_up_to_pool_size(pool: WorkerPool) -> None:
    release = threading.Event()
    running = []
    lock = threading.Lock()
    peak = [0]

    def op() -> None:
        with lock:
            running.append(1)
            peak[0] = max(peak[0], len(running))
        release.wait(5)
        with lock:
            running.pop()

    completions = [pool.submit(f"site_{i}", "ensure", op) for i in range(5)]
    deadline = threading.Event()
    for _ in range(50):
        with lock:
            if len(running) == 2:
                break
        deadline.wait(0.02)
    with lock:
        assert len(running) == 2  # bounded by the pool, not by the number of slivers
    release.set()
    for completion in completions:
        completion.wait(5)
    assert peak[0] == 2


def test_pending_job_of_same_kind_is_replaced_latest_wins(pool: WorkerPool) -> None:
    release = threading.Event()
    ran = []

    def blocker() -> None:
        release.wait(5)

    def job(tag: str):
        def run() -> str:
            ran.append(tag)
            return tag
        return run

    pool.submit("site_a", "start", blocker)
    old = pool.submit("site_a", "ensure", job("old"))
    new = pool.submit("site_a", "ensure", job("new"))
    release.set()
    assert new.wait(5) == "new"
    assert old.wait(5) == "new"  # the replaced job's waiter gets the newer outcome
    assert ran == ["new"]


def test_destroy_is_not_swallowed_by_a_later_update(pool: WorkerPool) -> None:
    release = threading.Event()
    ran = []
    pool.submit("site_a", "start", lambda: release.wait(5))
    destroy = pool.submit("site_a", "destroy", lambda: ran.append("destroy"))
    ensure = pool.submit("site_a", "ensure", lambda: ran.append("ensure"))
    release.set()
    destroy.wait(5)
    ensure.wait(5)
    assert ran == ["destroy", "ensure"]


def test_failure_reaches_waiter_and_other_slivers_continue(pool: WorkerPool) -> None:
    def boom() -> None:
        raise ValueError("broken sliver")

    bad = pool.submit("site_bad", "ensure", boom)
    good = pool.submit("site_good", "ensure", lambda: "fine")
    with pytest.raises(ValueError, match="broken sliver"):
        bad.wait(5)
    assert good.wait(5) == "fine"
    assert pool.wait_idle(5)
    assert pool.depth() == 0


def test_thread_count_does_not_grow_with_slivers() -> None:
    before = threading.active_count()
    pool = WorkerPool(4)
    try:
        completions = [pool.submit(f"site_{i}", "ensure", lambda: None) for i in range(2000)]
        peak = threading.active_count()
        for completion in completions:
            completion.wait(10)
        peak = max(peak, threading.active_count())
    finally:
        pool.shutdown()
    assert peak <= before + 4


def test_shutdown_cancels_pending_but_finishes_in_flight() -> None:
    pool = WorkerPool(1)
    release = threading.Event()
    started = threading.Event()
    finished = []

    def in_flight() -> None:
        started.set()
        release.wait(5)
        finished.append("in-flight")

    first = pool.submit("site_a", "start", in_flight)
    pending = pool.submit("site_b", "ensure", lambda: finished.append("pending"))
    assert started.wait(5)
    closer = threading.Thread(target=pool.shutdown, kwargs={"cancel_pending": True})
    closer.start()
    release.set()
    closer.join(5)
    first.wait(5)
    with pytest.raises(PoolClosed, match="shutting down"):
        pending.wait(5)
    assert finished == ["in-flight"]
    late = pool.submit("site_c", "ensure", lambda: None)
    with pytest.raises(PoolClosed):
        late.wait(1)


def test_start_and_stop_coalesce_latest_wins() -> None:
    """Alternating Start/Stop calls for one sliver cost one operation: the latest wanted run
    state replaces the pending one, and every waiter gets its outcome."""
    pool = WorkerPool(1)
    hold = threading.Event()
    ran: list[str] = []
    first = pool.submit("site_a", "stop", lambda: hold.wait(5))
    waiters = [pool.submit("site_a", kind, lambda kind=kind: ran.append(kind) or kind,
                           replaces=frozenset({"start", "stop"}))
               for kind in ("start", "stop", "start", "stop", "start")]
    hold.set()
    first.wait(5)
    assert [w.wait(5) for w in waiters] == ["start"] * 5
    assert ran == ["start"]
    pool.shutdown()


def test_done_callbacks_run_once_whenever_added() -> None:
    pool = WorkerPool(1, start=False)
    seen: list[object] = []
    completion = pool.submit("site_a", "ensure", lambda: 7)
    completion.add_done_callback(lambda c: seen.append(("early", c.wait())))
    pool.start()
    assert completion.wait(5) == 7
    completion.add_done_callback(lambda c: seen.append(("late", c.wait())))
    assert seen == [("early", 7), ("late", 7)]
    pool.shutdown()


def test_unstarted_pool_fails_waiters_on_shutdown() -> None:
    pool = WorkerPool(2, start=False)
    pending = pool.submit("site_a", "ensure", lambda: None)
    pool.shutdown()
    with pytest.raises(PoolClosed):
        pending.wait(1)
