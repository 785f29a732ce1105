"""A call whose answer is the outcome of a worker job: the API's deferred result.

Create, Destroy, Start and Stop wait for an operation on the per-sliver workers, which may take
seconds (a sliver whose processes ignore TERM) up to ``operation_timeout``. If each of those
calls held a dispatch thread while it waited, a caller alternating Start and Stop from a few
connections would hold all of them and starve every other caller (issue 10, item 7). So an
operation method does not wait: it returns a :class:`Pending` -- the job's completion, a
description, its time limit and the function turning the job's result into the call's answer --
and the server awaits the completion in its event loop, holding no thread. Synchronous callers
(tests, the fuzzer, a server built without deferral) use :meth:`Pending.wait` through
:func:`resolve`.

The "still in progress" answer is built here only, so both ways of waiting word it alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.errors import OperationFailed

__all__ = ["Pending", "Waitable", "resolve", "still_in_progress"]


class Waitable(Protocol):
    """What a Pending needs of a job's completion (``workers.Completion`` is one)."""

    def done(self) -> bool:
        """True once the job has finished (either way). Any thread."""
        ...

    def wait(self, timeout: float | None = None) -> Any:
        """Block up to ``timeout`` s; the job's result, or raise its error (TimeoutError while
        it has not finished). Any thread."""
        ...

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(self)`` once finished: at once if it is, else in the finishing thread."""
        ...


def _unchanged(result: Any) -> Any:
    return result


@dataclass(frozen=True, slots=True, eq=False)
class Pending:
    """The deferred answer of one call.

    ``finish`` runs once the job succeeded, in a dispatch thread (it may touch the store or call
    a hook, briefly); its return value is the call's answer. ``timeout`` is how long a caller
    waits before the call is answered "still in progress" (the job itself goes on).
    """

    completion: Waitable
    what: str
    timeout: float
    finish: Callable[[Any], Any] = _unchanged

    def outcome(self) -> Any:
        """The answer of a finished job: ``finish(result)``, or the job's error raised."""
        return self.finish(self.completion.wait(0))

    def wait(self) -> Any:
        """Block until the job finished (up to ``timeout``), then :meth:`outcome`."""
        try:
            self.completion.wait(self.timeout)
        except TimeoutError:
            if not self.completion.done():
                raise still_in_progress(self.what, self.timeout) from None
        return self.outcome()


def still_in_progress(what: str, timeout: float) -> OperationFailed:
    """The error answering a call whose operation outlived ``timeout`` (Fault 104)."""
    return OperationFailed(f"{what} is still in progress after {timeout:g} s; it continues in the background")


def resolve(answer: Any) -> Any:
    """``answer`` itself, or a Pending's outcome once waited for (blocking this thread)."""
    return answer.wait() if isinstance(answer, Pending) else answer
