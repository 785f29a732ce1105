"""The watcher: one thread that keeps one blocking query open to the authority and wakes the sync.

The sync loop polls the authority every ``poll_interval`` plus jitter; that stays as it is (a
safety net, and the clock of expiries). Beside it, while the authority offers blocking queries
(the client knows an index), :class:`AuthorityWatcher` runs one query at a time:

* changed -> the client keeps the new document and the watcher calls ``on_change`` (the daemon's
  ``poll_now``): the sync loop wakes and fetches the kept document through the normal path;
* not modified -> ask again at once (the authority ends a wait at a random point of its last
  sixteenth, so a fleet does not come back in lock-step);
* an error -> back off with jitter (1, 2, 4 ... 60 s, ``core.retry.backoff_delay``) and retry.

Against an authority without blocking queries (no index) the watcher only idles, waking after
each sync (:meth:`AuthorityWatcher.poke`) to see whether an index appeared. Why a thread of its
own rather than the sync loop: a wait holds a connection for minutes, and the sync loop must stay
free to run the periodic poll, ``nodemanager sync`` and the expiry of slivers meanwhile.
:meth:`AuthorityWatcher.stop` ends the wait in flight at once by closing its socket.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Protocol

from ..core.errors import NodeManagerError
from ..core.retry import backoff_delay

__all__ = ["AuthorityWatcher", "OUTCOMES", "WatchedAuthority"]

log = logging.getLogger(__name__)

#: Outcomes of one blocking query (``nodemanager_authority_waits_total{outcome}``).
OUTCOMES = ("changed", "not_modified", "error")
#: How long the watcher idles without an index before looking again (a poke comes sooner).
IDLE_CHECK_S = 5.0


class WatchedAuthority(Protocol):
    """What the watcher needs of the authority client (``AuthorityClient`` satisfies it)."""

    @property
    def index(self) -> str | None:
        """The index of the last document received, None when the authority offers no
        blocking queries. Read from the watcher's thread."""

    def wait_for_change(self, index: str, wait: int) -> bool:
        """One blocking query; True when the document changed. Raises NodeManagerError
        subclasses. Called from the watcher's thread only, one at a time."""

    def close_waits(self) -> None:
        """End the wait in flight and refuse later ones. Idempotent; from any thread."""


def _nothing(*_: object) -> None:
    return None


class AuthorityWatcher:
    """Keeps one blocking query open while the authority offers them (see the module docstring).

    ``wait`` is ``authority.blocking_wait`` (seconds, 1..600). ``on_change`` is called from the
    watcher's thread after a change (the daemon's ``poll_now``: it only sets a flag);
    ``on_outcome(outcome)`` after each query, with one of :data:`OUTCOMES`; ``on_mode(watching)``
    when the watcher starts or stops using blocking queries (metrics, ``status``). ``start``,
    ``stop`` from the daemon's thread; ``poke`` from any. ``rng`` and ``pause`` (how a backoff
    waits; default: on the stop event) are for tests."""

    def __init__(
        self,
        client: WatchedAuthority,
        *,
        wait: int,
        on_change: Callable[[], None],
        on_outcome: Callable[[str], None] = _nothing,
        on_mode: Callable[[bool], None] = _nothing,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        idle_check: float = IDLE_CHECK_S,
        rng: Callable[[], float] = random.random,
        pause: Callable[[float], object] | None = None,
    ) -> None:
        self.client = client
        self.wait = wait
        self._on_change = on_change
        self._on_outcome = on_outcome
        self._on_mode = on_mode
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.idle_check = idle_check
        self._rng = rng
        self._stop = threading.Event()
        #: How a backoff waits: on the stop event (ends at once on stop), or a test's recorder.
        self._pause = pause if pause is not None else self._stop.wait
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self._watching: bool | None = None
        self._synced = False  # poked once: a fetch has happened, "no index" now means "polling"
        #: Consecutive failed queries (0 after a good answer); read by tests and ``status``.
        self.failures = 0

    @property
    def watching(self) -> bool:
        """True while blocking queries are in use (False before the first document)."""
        return bool(self._watching)

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the authority watcher is already started")
        self._thread = threading.Thread(target=self._run, name="nm-authority-watch", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Look at the client's index again now (after a sync: an index may have appeared)."""
        self._synced = True
        self._poke.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread: the wait in flight is given up at once (its socket is shut down).
        Idempotent."""
        self._stop.set()
        self._poke.set()
        self.client.close_waits()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("event=authority-watch-stop-timeout seconds=%.1f", timeout)

    # --- the thread -------------------------------------------------------------------------
    def _set_mode(self, watching: bool) -> None:
        if watching == self._watching:
            return
        self._watching = watching
        log.info("event=authority-%s wait=%d", "watching" if watching else "polling", self.wait)
        self._on_mode(watching)

    def _run(self) -> None:
        while not self._stop.is_set():
            index = self.client.index
            if index is None:
                if self._synced:  # before the first fetch, no index says nothing yet
                    self._set_mode(False)
                self._poke.wait(self.idle_check)
                self._poke.clear()
                continue
            self._set_mode(True)
            self._one(index)

    def _one(self, index: str) -> None:
        """One query and what follows it (the callbacks, or the backoff after a failure)."""
        try:
            changed = self.client.wait_for_change(index, self.wait)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the watcher must live on
            if self._stop.is_set():
                return
            self.failures += 1
            delay = backoff_delay(self.failures, self.backoff_base, self.backoff_cap, self._rng)
            if isinstance(exc, NodeManagerError):
                log.warning("event=authority-wait-failed failures=%d retry_in=%.1fs error=%s",
                            self.failures, delay, exc)
            else:
                log.exception("event=authority-wait-bug failures=%d retry_in=%.1fs", self.failures, delay)
            self._report(self._on_outcome, "error")
            self._pause(delay)
            return
        self.failures = 0
        if self._stop.is_set():
            return
        self._report(self._on_outcome, "changed" if changed else "not_modified")
        if changed:
            log.info("event=authority-changed index=%s action=sync-now", self.client.index)
            self._report(self._on_change)

    @staticmethod
    def _report(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - an observer must not stop the watcher
            log.exception("event=authority-watch-callback-failed")
