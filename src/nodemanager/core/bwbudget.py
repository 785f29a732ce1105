"""Daily byte budgets (the original node manager's ``bwmon``): the period arithmetic, the
carry of HTB counters across resets, and the threshold/cap formula. Pure.

A sliver's budget is ``net_max_kbyte`` KiB per period (default: the node's ``[bwmon]
daily_max_kbyte``; 0 = no budget) with a threshold ``net_thresh_kbyte`` (default:
``daily_thresh_percent`` of the maximum). The bytes its HTB class sent in the current period
are its *used* bytes. Once ``used >= threshold`` the sliver is *capped*: its ceiling
(``nm_net_max_rate``) drops to what spreads the rest of its budget over the rest of the period,
``(max_bytes - used) * 8 / seconds_left`` bit/s, never below its minimum rate (nor the
resource's floor) and never above its own ceiling. The cap lifts when the period ends (used
bytes start again from 0) or when the authority raises the budget above what was used.

Counters: a poll reads each class's cumulative ``Sent N bytes``. What it adds to ``used`` is
the growth since the last reading; when the class was re-created since (a qdisc replacement, a
sliver re-created, the counter going backwards) the new counter counts from 0, so all of it is
added: used bytes never decrease within a period. The accounting of a sliver that goes away is
kept until its period ends, so re-creating a slice does not reset its budget.

Everything is a plain value: ``now`` is a parameter, nothing logs; the poller (``bwmon``) reads
the counters and the clock, writes the store and logs the events returned here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .rspec import MAX_VALUE, RESOURCES, parse_value

KIB = 1024
#: The least ceiling a cap sets (the minimum of ``nm_net_max_rate``), kbit/s.
FLOOR_KBIT = RESOURCES["nm_net_max_rate"].minimum
#: A cap moves only when the formula moves by more than this fraction: a sliver that sends at
#: its cap keeps the same formula value, and one that does not is not rewritten at every poll.
CAP_TOLERANCE = 0.05
#: PLC's tags of the budget (KiB per period).
MAX_TAG, THRESH_TAG = "net_max_kbyte", "net_thresh_kbyte"
#: PLC's tags of the second traffic class (Internet2) of the original; there is no such class
#: here, so they are accepted and ignored (the poller logs it).
IGNORED_TAGS = ("net_i2_max_kbyte", "net_i2_thresh_kbyte")

CAPPED, LIFTED = "capped", "lifted"


@dataclass(frozen=True, slots=True)
class BudgetDefaults:
    """The node's defaults (config ``[bwmon]``)."""

    max_kbyte: int = 0
    thresh_percent: int = 80


@dataclass(frozen=True, slots=True)
class Budget:
    """One sliver's budget in bytes per period (``max_bytes`` 0: none), and the ignored tags
    its attributes carry."""

    max_bytes: int
    thresh_bytes: int
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Accounting:
    """What the store keeps per sliver (also for a sliver that went away, until its period
    ends). ``counter`` is the class's counter at the last reading (None: no class then);
    ``cap_kbit`` the lowered ceiling while capped (None: not capped)."""

    name: str
    period_start: float
    used: int = 0
    counter: int | None = None
    max_bytes: int = 0
    thresh_bytes: int = 0
    cap_kbit: int | None = None

    @property
    def capped(self) -> bool:
        return self.cap_kbit is not None


@dataclass(frozen=True, slots=True)
class BudgetEvent:
    """A cap set (``capped``) or lifted (``lifted``, reason ``period-end`` or ``budget``)."""

    kind: str
    reason: str


def budget_from_attributes(attributes: Iterable[tuple[str, str]], defaults: BudgetDefaults) -> Budget:
    """The sliver's budget: its tags' (last parsable value of each; negative counts as 0),
    else the node's defaults. The threshold defaults to ``thresh_percent`` of the maximum and
    never exceeds it."""
    found: dict[str, int] = {}
    ignored: list[str] = []
    for tag, value in attributes:
        if tag in (MAX_TAG, THRESH_TAG):
            number = parse_value(value)
            if number is not None:
                found[tag] = min(MAX_VALUE, max(0, number))
        elif tag in IGNORED_TAGS and tag not in ignored:
            ignored.append(tag)
    max_kbyte = found.get(MAX_TAG, max(0, defaults.max_kbyte))
    percent = min(100, max(0, defaults.thresh_percent))
    thresh_kbyte = found.get(THRESH_TAG, max_kbyte * percent // 100)
    return Budget(max_kbyte * KIB, min(thresh_kbyte, max_kbyte) * KIB, tuple(ignored))


def period_start(start: float, now: float, period: float) -> float:
    """The start of the period ``now`` is in, for periods of ``period`` seconds from ``start``;
    a clock stepped back before ``start`` starts a new period at ``now``."""
    if now < start:
        return now
    if now < start + period:
        return start
    begin = start + ((now - start) // period) * period
    while now >= begin + period:  # float rounding of the division, by an ulp
        begin += period
    return begin


def counted(last: int | None, counter: int, recreated: bool) -> int:
    """Bytes to add for a class counter reading ``counter`` after ``last``: the growth, or the
    whole counter when the class is new, was re-created since, or went backwards."""
    if last is None or recreated or counter < last:
        return max(0, counter)
    return counter - last


def capped_ceil(max_bytes: int, used: int, seconds_left: float, min_rate: int, current_ceil: int) -> int:
    """The lowered ceiling, kbit/s: ``(max_bytes - used) * 8 / seconds_left`` bit/s, at least
    the minimum rate (and the floor of 8 kbit/s), at most the sliver's own ceiling."""
    seconds = max(1.0, float(seconds_left))
    rate = int(max(0, max_bytes - used) * 8 / seconds / 1000)
    return min(current_ceil, max(FLOOR_KBIT, min_rate, rate))


def step(
    previous: Accounting | None,
    name: str,
    counter: int | None,
    recreated: bool,
    budget: Budget,
    now: float,
    period: float,
    min_rate: int,
    ceil: int,
) -> tuple[Accounting, BudgetEvent | None]:
    """One poll of one live sliver: roll the period, add the counter's growth, set or lift the
    cap. ``counter`` None: the sliver has no class now (nothing counted; the next class counts
    from 0). ``min_rate``/``ceil`` are the sliver's effective, uncapped values."""
    acc = previous or Accounting(name, now)
    event: BudgetEvent | None = None
    start = period_start(acc.period_start, now, period)
    if start != acc.period_start:
        if acc.capped:
            event = BudgetEvent(LIFTED, "period-end")
        acc = replace(acc, period_start=start, used=0, cap_kbit=None)
    used = acc.used if counter is None else acc.used + counted(acc.counter, counter, recreated)
    cap: int | None = None
    if budget.max_bytes > 0 and used >= budget.thresh_bytes:
        cap = capped_ceil(budget.max_bytes, used, start + period - now, min_rate, ceil)
        old = acc.cap_kbit
        if old is not None and abs(cap - old) <= old * CAP_TOLERANCE:
            cap = old
        if old is None:
            event = BudgetEvent(CAPPED, "threshold")
    elif acc.capped:
        event = BudgetEvent(LIFTED, "budget")
    return replace(acc, used=used, counter=counter, max_bytes=budget.max_bytes,
                   thresh_bytes=budget.thresh_bytes, cap_kbit=cap), event


def idle(acc: Accounting, now: float, period: float) -> Accounting | None:
    """A sliver with accounting but no account now: kept (its class forgotten) until its
    period ends, then dropped (None)."""
    if period_start(acc.period_start, now, period) != acc.period_start:
        return None
    return acc if acc.counter is None else replace(acc, counter=None)


def caps_of(rows: Mapping[str, Accounting]) -> dict[str, int]:
    """sliver -> its cap (kbit/s), for the capped slivers of ``rows``."""
    return {name: acc.cap_kbit for name, acc in rows.items() if acc.cap_kbit is not None}


def apply_byte_caps(rspecs: Mapping[str, Mapping[str, int]], caps: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Effective RSpecs with each capped sliver's ``nm_net_max_rate`` lowered to its cap, kept
    within ``[max(floor, nm_net_min_rate), own ceiling]`` (loans may have moved both since the
    cap was computed). Slivers without a cap keep their (shared) RSpec objects."""
    result = dict(rspecs)
    for name, cap in caps.items():
        rspec = result.get(name)
        if rspec is None or "nm_net_max_rate" not in rspec:
            continue
        ceil = rspec["nm_net_max_rate"]
        lowered = min(ceil, max(FLOOR_KBIT, rspec.get("nm_net_min_rate", 0), cap))
        result[name] = {**rspec, "nm_net_max_rate": lowered}
    return result  # type: ignore[return-value]
