"""Keeping files that will be executed out of forked children's hands.

Why: when a thread forks (every ``subprocess`` call does) while another thread holds a file open
for writing, the child holds a copy of that descriptor until its own ``exec`` (``O_CLOEXEC``
closes it only then). Meanwhile the kernel refuses to execute that file: ``exec`` fails with
ETXTBSY, "Text file busy". That is how a sliver's initscript, written by one worker while another
worker started a program, failed to start -- the sliver recorded as running with nothing running
(found by the kill -9 churn test, about one run in fifteen). So a write of a file that will be
executed holds :data:`FORK_GUARD` exclusively while its descriptor is open, and every fork holds
it shared until the child has exec'd (``subprocess.Popen`` returns only then). Writers are
preferred, so a steady stream of commands cannot starve one.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class ForkGuard:
    """A shared/exclusive lock: many forks at once, or one executable-file write."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._forks = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def forking(self) -> Iterator[None]:
        """Held from fork to the child's exec."""
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._forks += 1
        try:
            yield
        finally:
            with self._cond:
                self._forks -= 1
                if not self._forks:
                    self._cond.notify_all()

    @contextmanager
    def writing_executable(self) -> Iterator[None]:
        """Held while a file that will be executed is open for writing."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._forks:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


#: The one guard of this process.
FORK_GUARD = ForkGuard()


def popen(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` under :data:`FORK_GUARD` (it returns once the child has exec'd)."""
    with FORK_GUARD.forking():
        return subprocess.Popen(args, **kwargs)


def run(args: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run`` (never ``check``) whose fork holds :data:`FORK_GUARD`. Raises
    ``subprocess.TimeoutExpired`` after killing the child, as ``subprocess.run`` does."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen(args, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        except BaseException:
            process.kill()
            raise
        return subprocess.CompletedProcess(process.args, process.wait(), stdout, stderr)
