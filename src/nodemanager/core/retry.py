"""The one backoff rule: how long to wait before trying again after failures in a row.

Used for a sliver's failed operations (30 s doubling up to an hour), for a failed poll of the
authority (30 s doubling up to the poll period) and for the authority client's retries within
one fetch (1 s doubling). Jitter spreads the retries of a fleet (or of many slivers) that failed
together, so that they do not come back together.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    failures: int, base: float, cap: float = float("inf"), rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after ``failures`` failures in a row (1 for the first): ``base`` doubled
    per further failure, at most ``cap``, then scaled by a random factor in [0.5, 1.5)."""
    exponent = min(max(0, failures - 1), 62)
    return min(cap, base * (2**exponent)) * (0.5 + rng())
