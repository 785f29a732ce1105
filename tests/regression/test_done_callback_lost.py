"""A done-callback added while its job finishes is still called.

The API answers Create/Destroy/Start/Stop without holding a thread: it registers a callback on
the job's ``Completion`` that wakes the event loop. ``add_done_callback`` checked "not finished"
and appended under a lock that ``_finish`` did not take, so a job finishing between the check and
the append took the (still empty) callback list away and the callback was never called: the call
then waited its whole operation timeout (120 s) for an operation done in milliseconds.
``_finish`` now marks the job finished and takes the callbacks under that same lock.
"""

from __future__ import annotations

import threading

from nodemanager.workers import Completion


class FinishedRightAfterTheCheck(Completion):
    """A Completion whose job finishes (in another thread) right after ``add_done_callback``
    has read "not finished": the interleaving that lost the callback."""

    __slots__ = ("_state", "adder", "finisher")

    def __init__(self) -> None:
        self._state = False
        self.adder: threading.Thread | None = None
        self.finisher: threading.Thread | None = None
        super().__init__()

    @property  # type: ignore[override]
    def _finished(self) -> bool:
        value = self._state
        if threading.current_thread() is self.adder and self.finisher is None:
            self.finisher = threading.Thread(target=self._finish, args=("done", None))
            self.finisher.start()
            self.finisher.join(0.5)  # a _finish that waits for the adder's lock waits no longer
        return value

    @_finished.setter
    def _finished(self, value: bool) -> None:
        self._state = value


def test_a_callback_registered_as_the_job_finishes_is_called() -> None:
    completion = FinishedRightAfterTheCheck()
    completion.adder = threading.current_thread()
    called: list[object] = []
    completion.add_done_callback(lambda c: called.append(c.wait(0)))
    assert completion.finisher is not None
    completion.finisher.join(5)
    assert called == ["done"]
