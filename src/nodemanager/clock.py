"""Time as a port: the core never reads the clock, adapters get a Clock by constructor."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall clock: expiries and document timestamps)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (durations, timeouts)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
