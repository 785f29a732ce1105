"""A file written to be executed is never held open by a forked child (``forkguard``).

Found by the kill -9 churn test: a sliver's initscript, written by one worker while another
worker's spawn (a fork whose child runs Python before exec, to join cgroups) was in flight,
failed to start with "Text file busy" -- the sliver recorded as running, nothing running. Without
the guard this test's loop meets ETXTBSY on about half of its executions."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from nodemanager import forkguard
from nodemanager.forkguard import ForkGuard
from nodemanager.hostfiles import LinkSafeFiles


def test_no_exec_of_a_just_written_program_meets_text_file_busy(tmp_path: Path) -> None:
    files = LinkSafeFiles()
    stop = threading.Event()

    def slow_child_setup() -> None:  # what spawn_detached's cgroup join does between fork and exec
        time.sleep(0.003)

    def fork_loop() -> None:
        while not stop.is_set():
            forkguard.popen(["true"], preexec_fn=slow_child_setup).wait()  # noqa: PLW1509

    forkers = [threading.Thread(target=fork_loop) for _ in range(3)]
    for thread in forkers:
        thread.start()
    failures: list[str] = []
    try:
        for i in range(120):
            program = tmp_path / f"initscript{i % 4}"
            files.atomic_write(program, b"#!/bin/sh\nexit 0\n", uid=-1, gid=-1, mode=0o755)
            try:
                forkguard.run([str(program)], capture_output=True)
            except OSError as exc:
                failures.append(str(exc))
    finally:
        stop.set()
        for thread in forkers:
            thread.join()
    assert failures == []


def test_an_executable_write_waits_for_forks_and_forks_wait_for_it() -> None:
    guard = ForkGuard()
    order: list[str] = []
    in_fork = threading.Event()
    release = threading.Event()

    def fork() -> None:
        with guard.forking():
            in_fork.set()
            release.wait(5)
            order.append("fork done")

    def write() -> None:
        with guard.writing_executable():
            order.append("write")

    forking = threading.Thread(target=fork)
    forking.start()
    assert in_fork.wait(5)
    writing = threading.Thread(target=write)
    writing.start()
    writing.join(0.1)
    assert writing.is_alive()  # waits for the fork to reach its exec
    release.set()
    forking.join(5)
    writing.join(5)
    assert order == ["fork done", "write"]
