"""Blocking queries, the asyncio glue: hold a request until its node's document changes.

:class:`HeldQueries` lives in the server's event loop. It keeps the loop's view of every node's
index (the newest :class:`~.documents.Snapshot` it has seen), the :class:`~.waits.WaitRegistry`,
one timer for the earliest deadline, and wakes waiters when a newer snapshot arrives: their
answers are rendered on the worker pool one batch at a time, each batch written as soon as it is
ready. What an answer *is* (an HTTP response) is the caller's business: it passes the functions
that render them, and the hub hands back whatever they return.

Not thread-safe: every method runs in the event loop (:meth:`adopt` is posted there by the
reloading thread with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .documents import Snapshot
from .waits import Waiter, WaitRegistry, changed_nodes, jittered_wait

log = logging.getLogger(__name__)

#: Woken waiters' answers are rendered this many per worker job, so the first go out early.
RENDER_BATCH = 256


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """Node ``node_id`` holds ``index`` (current in ``snapshot``, as a worker saw it) and may wait
    ``wait`` seconds; ``kind`` says how to render its answer."""

    kind: str
    node_id: int
    index: str
    wait: int
    snapshot: Snapshot


@dataclass(slots=True)
class _Pending:
    """The token a held request leaves in the wait registry."""

    kind: str
    future: asyncio.Future[Any]


_NOT_MODIFIED = object()

#: ``(snapshot, [(kind, node_id), ...]) -> answers`` on a worker thread.
RenderMany = Callable[[Snapshot, Sequence[tuple[str, int]]], list[Any]]


class HeldQueries:
    """The event loop's side of blocking queries (see the module doc)."""

    def __init__(
        self,
        first: Snapshot,
        *,
        offload: Callable[..., Awaitable[Any]],
        render_many: RenderMany,
        not_modified: Callable[[str, str], Any],
        rng: Callable[[], float],
    ) -> None:
        self.registry = WaitRegistry()
        #: The newest snapshot the loop has seen: the indexes waiters are compared with.
        self.current = first
        self._offload = offload
        self._render_many = render_many
        self._not_modified = not_modified
        #: Draws each wait's jitter, uniform in [0, 1]; the server's, so tests can pin it.
        self.rng = rng
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at: float | None = None

    async def hold(self, request: HoldRequest) -> Any:
        """The answer to a blocking query: the node's new document when it changes (at once if
        it already did), "not modified" when the wait ends or a newer wait of the node arrives.
        Cancelled (the client went away): the wait is given up."""
        loop = asyncio.get_running_loop()
        self.adopt(request.snapshot)  # never compare with an older view than the worker's
        current = self.current
        if current.indexes.get(request.node_id) != request.index:  # changed since the worker looked
            [answer] = await self._offload(self._render_many, current, [(request.kind, request.node_id)])
            return answer
        future: asyncio.Future[Any] = loop.create_future()
        deadline = loop.time() + jittered_wait(request.wait, self.rng())
        waiter = Waiter(request.node_id, request.index, deadline, _Pending(request.kind, future))
        previous = self.registry.add(waiter)
        if previous is not None:
            self._settle(previous, _NOT_MODIFIED)  # one outstanding wait per node
        self._arm_expiry()
        try:
            outcome = await future
        except asyncio.CancelledError:
            self.registry.remove(waiter)
            raise
        if outcome is _NOT_MODIFIED:
            return self._not_modified(request.kind, request.index)
        return outcome

    def adopt(self, snapshot: Snapshot) -> None:
        """Adopt ``snapshot`` if it is newer than the loop's view -- a reload reaches the loop
        from the reloading thread, from the watcher and with a held request: whichever comes first
        wins, none is lost, none goes back in time -- and wake the waiters of the nodes it changed."""
        if snapshot.generation <= self.current.generation:
            return
        changed = changed_nodes(self.current.indexes, snapshot.indexes)
        self.current = snapshot
        woken = self.registry.changed(snapshot.indexes, changed)
        log.info("event=data-reloaded nodes_changed=%d waiters_woken=%d", len(changed), len(woken))
        if woken:
            self._render_next(snapshot, woken, 0)

    def release_all(self) -> None:
        """Answer every held query "not modified" (the server is stopping)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = self._expiry_at = None
        for waiter in self.registry.expired(float("inf")):
            self._settle(waiter, _NOT_MODIFIED)

    # --- internals ------------------------------------------------------------------------
    def _settle(self, waiter: Waiter, outcome: Any) -> None:
        future = waiter.token.future
        if not future.done():
            future.set_result(outcome)

    def _arm_expiry(self) -> None:
        deadline = self.registry.next_deadline()
        if deadline is None or (self._expiry_at is not None and self._expiry_at <= deadline):
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = deadline
        self._expiry = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._expiry = self._expiry_at = None
        for waiter in self.registry.expired(asyncio.get_running_loop().time()):
            self._settle(waiter, _NOT_MODIFIED)
        self._arm_expiry()

    def _render_next(self, snapshot: Snapshot, woken: list[Waiter], start: int) -> None:
        """Render one batch of the woken waiters' answers (batches rendered side by side would
        all finish late, together)."""
        batch = woken[start:start + RENDER_BATCH]
        try:
            rendering = asyncio.ensure_future(
                self._offload(self._render_many, snapshot, [(w.token.kind, w.node_id) for w in batch]))
        except RuntimeError:  # the pool is shut down: stopping
            for waiter in woken[start:]:
                self._settle(waiter, _NOT_MODIFIED)
            return
        rendering.add_done_callback(lambda done: self._deliver(snapshot, woken, start, done))

    def _deliver(self, snapshot: Snapshot, woken: list[Waiter], start: int, rendering: asyncio.Future[Any]) -> None:
        batch = woken[start:start + RENDER_BATCH]
        if rendering.cancelled() or rendering.exception() is not None:
            if not rendering.cancelled():
                log.error("event=authority-render-failed error=%r", rendering.exception())
            for waiter in batch:  # answer something rather than leave them hanging
                self._settle(waiter, _NOT_MODIFIED)
        else:
            for waiter, answer in zip(batch, rendering.result()):
                self._settle(waiter, answer)
        if start + RENDER_BATCH < len(woken):
            self._render_next(snapshot, woken, start + RENDER_BATCH)
