"""Blocking queries, the pure part: who waits for which node's document, and whom to wake.

A node holds version ``index`` of its document and asks to be answered when its document changes
or after ``wait`` seconds (docs/blocking-queries.md). :class:`WaitRegistry` keeps one
:class:`Waiter` per node (a newer one supersedes the older, which is answered "not modified" at
once), hands back the waiters a document change concerns (:meth:`WaitRegistry.changed`) and those
whose time is up (:meth:`WaitRegistry.expired`). It does no I/O, reads no clock and knows nothing
of asyncio: times are passed in, and the caller's pending request travels as an opaque ``token``
(the asyncio glue in :mod:`.server` passes its future). Not thread-safe: the server uses it from
its event loop only.

Also here: the wire rules of the protocol -- a valid index, the clamp of ``wait`` to 1..600 s and
the jitter that ends a wait at a random point of ``[wait - wait/16, wait]`` so that a fleet does
not re-poll in lock-step.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import InvalidArgument

#: An index on the wire: 1..64 characters of ``[A-Za-z0-9_-]``.
INDEX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MIN_WAIT = 1
MAX_WAIT = 600
#: A wait ends at a random point of its last sixteenth.
JITTER_FRACTION = 1 / 16


def checked_index(value: Any) -> str:
    """``value`` if it is a valid index (a string of 1..64 ``[A-Za-z0-9_-]``), else InvalidArgument."""
    if not isinstance(value, str) or not INDEX_PATTERN.fullmatch(value):
        raise InvalidArgument("index must be a string of 1 to 64 characters [A-Za-z0-9_-]")
    return value


def clamped_wait(value: Any) -> int:
    """The wait in seconds, clamped to ``MIN_WAIT..MAX_WAIT``; InvalidArgument unless an int
    (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("wait must be an integer number of seconds")
    return max(MIN_WAIT, min(MAX_WAIT, value))


def wait_from_query(text: str) -> int:
    """The ``wait`` query parameter of slices.xml (decimal digits), clamped like :func:`clamped_wait`."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise InvalidArgument("wait must be a number of seconds")
    return clamped_wait(int(text))


def jittered_wait(wait: int, fraction: float) -> float:
    """The wait actually used for a requested ``wait`` (already clamped): ``wait - wait/16 *
    fraction``, ``fraction`` drawn uniformly from [0, 1] by the caller."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be within [0, 1]")
    return wait - wait * JITTER_FRACTION * fraction


@dataclass(eq=False, slots=True)
class Waiter:
    """One held request: node ``node_id`` holds ``index`` and waits until ``deadline``.

    Compared by identity: two requests of the same node with the same index are two waiters."""

    node_id: int
    index: str
    deadline: float
    token: Any = None
    #: Set once the registry let go of it (woken, expired, superseded or removed).
    done: bool = field(default=False, compare=False)


class WaitRegistry:
    """At most one waiter per node; expiry by deadline (a heap with lazy deletion)."""

    def __init__(self) -> None:
        self._by_node: dict[int, Waiter] = {}
        self._heap: list[tuple[float, int, Waiter]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._by_node)

    def __contains__(self, waiter: object) -> bool:
        return isinstance(waiter, Waiter) and self._by_node.get(waiter.node_id) is waiter

    def waiter_of(self, node_id: int) -> Waiter | None:
        return self._by_node.get(node_id)

    def add(self, waiter: Waiter) -> Waiter | None:
        """Register ``waiter``; returns the node's previous waiter (now let go, to be answered
        "not modified" at once by the caller), if any."""
        if waiter.done:
            raise ValueError("a waiter that was let go cannot wait again")
        previous = self._by_node.get(waiter.node_id)
        if previous is not None:
            previous.done = True
        self._by_node[waiter.node_id] = waiter
        heapq.heappush(self._heap, (waiter.deadline, next(self._sequence), waiter))
        self._compact()
        return previous

    def remove(self, waiter: Waiter) -> bool:
        """Let ``waiter`` go (its request ended otherwise, e.g. the connection closed). True if it
        was still registered. Idempotent."""
        if self._by_node.get(waiter.node_id) is not waiter:
            return False
        del self._by_node[waiter.node_id]
        waiter.done = True
        return True

    def changed(self, indexes: Mapping[int, str], nodes: Iterable[int] | None = None) -> list[Waiter]:
        """The waiters whose node's current index (``indexes``; a node missing from it has no
        document any more) differs from the index they hold, let go. ``nodes`` limits the check
        to the nodes a reload changed (default: every waiting node)."""
        candidates = self._by_node.keys() if nodes is None else (n for n in nodes if n in self._by_node)
        woken = [self._by_node[n] for n in list(candidates) if indexes.get(n) != self._by_node[n].index]
        for waiter in woken:
            self.remove(waiter)
        return woken

    def expired(self, now: float) -> list[Waiter]:
        """The waiters whose deadline is at or before ``now``, let go, earliest first."""
        out: list[Waiter] = []
        while self._heap and self._heap[0][0] <= now:
            _, _, waiter = heapq.heappop(self._heap)
            if self.remove(waiter):
                out.append(waiter)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of a registered waiter (None when nobody waits)."""
        while self._heap and self._heap[0][2].done:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def _compact(self) -> None:
        """Drop let-go entries once they outnumber the live ones (superseding keeps them)."""
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._by_node):
            self._heap = [entry for entry in self._heap if not entry[2].done]
            heapq.heapify(self._heap)


def changed_nodes(old: Mapping[int, str], new: Mapping[int, str]) -> set[int]:
    """The nodes whose index differs between two reloads (added, removed or changed)."""
    return {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
