"""The one backoff rule: how long to wait before trying again after failures in a row.

Used for a sliver's failed operations (30 s doubling up to an hour), for a failed poll of the
authority (30 s doubling up to the poll period) and for the authority client's retries within
one fetch (1 s doubling). Jitter spreads the retries of a fleet (or of many slivers) that failed
together, so that they do not come back together.
"""

from __future__ import annotations

from collections.abc import Callable


def backoff_delay(failures: int, base: float, cap: float, rng: Callable[[], float]) -> float:
    """Seconds to wait after ``failures`` failures in a row (1 for the first): ``base`` doubled
    per further failure, at most ``cap``, then scaled by ``0.5 + rng()`` (``rng`` returns a
    number in [0, 1): ``random.random``, or a fixed one in tests)."""
    exponent = min(max(0, failures - 1), 62)
    return min(cap, base * (2**exponent)) * (0.5 + rng())
