"""Per-caller limits on the API: one sliver must not starve the others (issue 10, item 7).

The global connection cap (``max_connections``, 512) alone lets one sliver take every connection,
and every dispatch thread, of the node. So each caller -- the uid the kernel names; every caller
without an identity shares one bucket -- also has its own caps:

* **connections**: at most :data:`MAX_CONNECTIONS_PER_UID` open at once; one more is answered
  503 and closed at once, like one beyond the global cap;
* **calls**: at most :data:`MAX_CALLS_PER_UID` calls being dispatched, or awaiting their
  operation, at once. The next one waits its turn in the event loop (an asyncio semaphore, FIFO),
  holding no dispatch thread, so other callers' calls go ahead meanwhile.

With the 16 dispatch threads and the defaults, one caller holds at most a quarter of them, and
none while its operation calls (Start, Stop, ...) wait on the sliver workers (:mod:`.calls`).

**Root is exempt** from both: uid 0 is the node's operator and its tools (and could stop the
daemon outright), so a cap would only throttle legitimate bulk use such as a monitoring sweep;
the global cap still bounds it. A sliver cannot become root through the API: an identity is
never guessed (:mod:`.peercred`).

Loop thread only: nothing here is thread-safe, and nothing needs to be.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

__all__ = ["MAX_CALLS_PER_UID", "MAX_CONNECTIONS_PER_UID", "CallerLimits"]

#: Open connections per uid (anonymous callers together count as one uid).
MAX_CONNECTIONS_PER_UID = 32
#: Calls per uid being dispatched or awaiting their operation at once.
MAX_CALLS_PER_UID = 4
#: The uid no per-caller cap applies to.
EXEMPT_UID = 0


@dataclass
class _Bucket:
    """One caller's open connections and its call slots (exists while it has a connection)."""

    calls: asyncio.Semaphore
    connections: int = field(default=0)


class CallerLimits:
    """The per-uid connection count and call slots of one server."""

    def __init__(
        self, *, max_connections: int = MAX_CONNECTIONS_PER_UID, max_calls: int = MAX_CALLS_PER_UID
    ) -> None:
        if max_connections < 1 or max_calls < 1:
            raise ValueError("per-caller limits must be positive")
        self.max_connections = max_connections
        self.max_calls = max_calls
        self._buckets: dict[int | None, _Bucket] = {}

    def admit(self, uid: int | None) -> bool:
        """Count a new connection of ``uid``; False (nothing counted) when it is at its cap.
        Every admitted connection is released exactly once (:meth:`release`)."""
        if uid == EXEMPT_UID:
            return True
        bucket = self._buckets.get(uid)
        if bucket is None:
            bucket = self._buckets[uid] = _Bucket(asyncio.Semaphore(self.max_calls))
        elif bucket.connections >= self.max_connections:
            return False
        bucket.connections += 1
        return True

    def release(self, uid: int | None) -> None:
        """Forget one admitted connection of ``uid``."""
        if uid == EXEMPT_UID:
            return
        bucket = self._buckets[uid]
        bucket.connections -= 1
        if bucket.connections == 0:
            del self._buckets[uid]

    def call_slots(self, uid: int | None) -> asyncio.Semaphore | None:
        """The semaphore an admitted connection of ``uid`` holds around each call; None for
        the exempt uid (no limit)."""
        if uid == EXEMPT_UID:
            return None
        return self._buckets[uid].calls

    def connections(self, uid: int | None) -> int:
        """How many connections of ``uid`` are counted (0 for the exempt uid)."""
        bucket = self._buckets.get(uid)
        return 0 if bucket is None else bucket.connections
