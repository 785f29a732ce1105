"""Daily byte budgets, the pure part (``core.bwbudget``): budgets from PLC's tags, periods,
counter resets carried, the cap formula and its bounds, and the cap applied to an RSpec."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.bwbudget import (
    CAP_TOLERANCE,
    CAPPED,
    FLOOR_KBIT,
    KIB,
    LIFTED,
    Accounting,
    Budget,
    BudgetDefaults,
    apply_byte_caps,
    budget_from_attributes,
    capped_ceil,
    caps_of,
    counted,
    idle,
    period_start,
    step,
)

DAY = 86400.0
NONE = BudgetDefaults()


# --- budgets from tags ----------------------------------------------------------------------
def test_no_tags_and_no_default_is_no_budget() -> None:
    assert budget_from_attributes([], NONE) == Budget(0, 0)


def test_node_defaults_apply_and_threshold_is_a_percentage() -> None:
    assert budget_from_attributes([], BudgetDefaults(1000, 80)) == Budget(1000 * KIB, 800 * KIB)


@pytest.mark.parametrize(("tags", "expected"), [
    ([("net_max_kbyte", "2000")], Budget(2000 * KIB, 1600 * KIB)),
    ([("net_max_kbyte", "2000"), ("net_thresh_kbyte", "1000")], Budget(2000 * KIB, 1000 * KIB)),
    ([("net_max_kbyte", "2000"), ("net_thresh_kbyte", "5000")], Budget(2000 * KIB, 2000 * KIB)),  # <= max
    ([("net_max_kbyte", "0")], Budget(0, 0)),  # explicit 0: no budget, whatever the default
    ([("net_max_kbyte", "junk")], Budget(500 * KIB, 400 * KIB)),  # unparsable: the default
    ([("net_max_kbyte", "-5")], Budget(0, 0)),
    ([("net_max_kbyte", "100"), ("net_max_kbyte", "300")], Budget(300 * KIB, 240 * KIB)),  # last wins
])
def test_tags(tags: list[tuple[str, str]], expected: Budget) -> None:
    assert budget_from_attributes(tags, BudgetDefaults(500, 80)) == expected


def test_i2_tags_are_reported_as_ignored() -> None:
    got = budget_from_attributes([("net_i2_max_kbyte", "5"), ("net_i2_thresh_kbyte", "4"),
                                  ("net_i2_max_kbyte", "6")], NONE)
    assert got.ignored == ("net_i2_max_kbyte", "net_i2_thresh_kbyte") and got.max_bytes == 0


# --- periods and counters -------------------------------------------------------------------
@pytest.mark.parametrize(("now", "expected"), [
    (1000.0, 1000.0), (1000.0 + DAY - 1, 1000.0), (1000.0 + DAY, 1000.0 + DAY),
    (1000.0 + 3.5 * DAY, 1000.0 + 3 * DAY),  # down for days: the cadence is kept
    (500.0, 500.0),  # clock stepped back before the start: a new period now
])
def test_period_start(now: float, expected: float) -> None:
    assert period_start(1000.0, now, DAY) == expected


@pytest.mark.parametrize(("last", "counter", "recreated", "expected"), [
    (None, 700, False, 700),  # first reading: the class counted from 0
    (100, 700, False, 600),
    (700, 700, False, 0),
    (700, 50, False, 50),  # backwards: a new class, counted from 0
    (100, 700, True, 700),  # re-created (even though it grew past the old value)
])
def test_counted(last: int | None, counter: int, recreated: bool, expected: int) -> None:
    assert counted(last, counter, recreated) == expected


# --- the cap formula --------------------------------------------------------------------------
def test_capped_ceil_is_the_formula() -> None:
    # 1 MB left over 8 s: 1e6 * 8 / 8 = 1 Mbit/s
    assert capped_ceil(2_000_000, 1_000_000, 8.0, 0, 10_000) == 1000


def test_capped_ceil_bounds() -> None:
    assert capped_ceil(1000, 5000, 10.0, 0, 10_000) == FLOOR_KBIT  # over budget: the floor
    assert capped_ceil(1000, 5000, 10.0, 300, 10_000) == 300  # never below the minimum rate
    assert capped_ceil(10**12, 0, 1.0, 0, 4000) == 4000  # never above its own ceiling
    assert capped_ceil(10**6, 0, 0.0, 0, 10**7) == 8000  # no time left: as if one second


@settings(max_examples=400, deadline=None)
@given(max_bytes=st.integers(0, 10**13), used=st.integers(0, 10**13), left=st.floats(0, 2 * DAY),
       min_rate=st.integers(0, 10**7), ceil=st.integers(FLOOR_KBIT, 10**7))
def test_capped_ceil_is_within_bounds(max_bytes: int, used: int, left: float, min_rate: int, ceil: int) -> None:
    got = capped_ceil(max_bytes, used, left, min_rate, ceil)
    assert got <= ceil
    assert got >= min(ceil, max(FLOOR_KBIT, min_rate))


# --- one poll ---------------------------------------------------------------------------------
BUDGET = Budget(2000 * KIB, 1000 * KIB)


def test_first_sighting_opens_a_period_and_counts_the_class() -> None:
    acc, event = step(None, "a", 5000, False, BUDGET, 100.0, DAY, 0, 8000)
    assert acc == Accounting("a", 100.0, 5000, 5000, BUDGET.max_bytes, BUDGET.thresh_bytes, None)
    assert event is None


def test_capped_past_the_threshold_with_the_formula_then_lifted_at_the_period_end() -> None:
    acc, _ = step(None, "a", 0, False, BUDGET, 0.0, 100.0, 0, 8000)
    acc, event = step(acc, "a", 1_100_000, False, BUDGET, 20.0, 100.0, 0, 8000)
    assert event is not None and event.kind == CAPPED
    assert acc.cap_kbit == capped_ceil(BUDGET.max_bytes, 1_100_000, 80.0, 0, 8000) == 94
    acc, event = step(acc, "a", 1_100_000, False, BUDGET, 100.0, 100.0, 0, 8000)
    assert event is not None and event.kind == LIFTED and event.reason == "period-end"
    assert acc.used == 0 and acc.cap_kbit is None and acc.period_start == 100.0


def test_a_cap_moves_only_past_the_tolerance() -> None:
    acc, _ = step(None, "a", 1_500_000, False, BUDGET, 0.0, 100.0, 0, 8000)
    assert acc.cap_kbit is not None
    nudged, event = step(acc, "a", 1_500_000, False, BUDGET, 1.0, 100.0, 0, 8000)
    assert event is None and nudged.cap_kbit == acc.cap_kbit  # 1 % later: unchanged
    later, _ = step(acc, "a", 1_500_000, False, BUDGET, 50.0, 100.0, 0, 8000)
    assert later.cap_kbit is not None and later.cap_kbit > acc.cap_kbit * (1 + CAP_TOLERANCE)


def test_a_raised_budget_lifts_the_cap() -> None:
    acc, _ = step(None, "a", 1_500_000, False, BUDGET, 0.0, 100.0, 0, 8000)
    acc, event = step(acc, "a", 1_500_000, False, Budget(10**9, 10**8), 1.0, 100.0, 0, 8000)
    assert event is not None and event.kind == LIFTED and event.reason == "budget" and not acc.capped


def test_no_budget_never_caps() -> None:
    acc, event = step(None, "a", 10**12, False, Budget(0, 0), 0.0, 100.0, 0, 8000)
    assert event is None and not acc.capped and acc.used == 10**12


def test_no_class_counts_nothing_and_the_next_class_counts_from_zero() -> None:
    acc, _ = step(None, "a", 900, False, BUDGET, 0.0, 100.0, 0, 8000)
    acc, _ = step(acc, "a", None, False, BUDGET, 1.0, 100.0, 0, 8000)
    assert acc.used == 900 and acc.counter is None
    acc, _ = step(acc, "a", 2000, False, BUDGET, 2.0, 100.0, 0, 8000)
    assert acc.used == 2900


def test_a_gone_sliver_keeps_its_accounting_until_the_period_ends() -> None:
    acc = Accounting("a", 0.0, 1234, 999, 10, 5, 77)
    assert idle(acc, 50.0, 100.0) == replace(acc, counter=None)
    assert idle(acc, 100.0, 100.0) is None


# --- properties -------------------------------------------------------------------------------
readings = st.lists(st.tuples(
    st.floats(0, 30),  # seconds since the last poll
    st.one_of(st.none(), st.integers(0, 10**9)),  # counter (None: no class)
    st.booleans(),  # re-created
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(polls=readings, period=st.floats(1, 200), min_rate=st.integers(0, 20_000),
       ceil=st.integers(FLOOR_KBIT, 20_000), max_kb=st.integers(0, 10**6), thresh_kb=st.integers(0, 10**6))
def test_properties_over_random_polls(polls: list[tuple[float, int | None, bool]], period: float, min_rate: int,
                                      ceil: int, max_kb: int, thresh_kb: int) -> None:
    """Used bytes never decrease within a period, whatever the counters do; every period ends
    with a reset; a cap is set only at or past the threshold, never below the minimum rate (nor
    the floor) unless that is above the ceiling, never above the ceiling."""
    budget = Budget(max_kb * KIB, min(max_kb, thresh_kb) * KIB)
    now = 0.0
    acc, _ = step(None, "a", 0, False, budget, now, period, min_rate, ceil)
    for dt, counter, recreated in polls:
        now += dt
        new, event = step(acc, "a", counter, recreated, budget, now, period, min_rate, ceil)
        if now >= acc.period_start + period:
            assert new.period_start > acc.period_start and new.period_start <= now < new.period_start + period
            assert new.used == (0 if counter is None else counted(acc.counter, counter, recreated))
            if acc.capped and not new.capped:
                assert event is not None and event.kind == LIFTED
        else:
            assert new.period_start == acc.period_start and new.used >= acc.used
        if new.capped:
            assert budget.max_bytes > 0 and new.used >= budget.thresh_bytes
            assert new.cap_kbit is not None and new.cap_kbit <= ceil
            assert new.cap_kbit >= min(ceil, max(FLOOR_KBIT, min_rate))
        else:
            assert budget.max_bytes == 0 or new.used < budget.thresh_bytes
        acc = new


# --- the cap applied ----------------------------------------------------------------------------
def test_apply_byte_caps_lowers_only_the_capped_ceiling_within_bounds() -> None:
    rspecs = {"a": {"nm_net_min_rate": 100, "nm_net_max_rate": 5000},
              "b": {"nm_net_min_rate": 0, "nm_net_max_rate": 5000}}
    rows = {"a": Accounting("a", 0.0, cap_kbit=1000), "b": Accounting("b", 0.0), "gone": Accounting("gone", 0.0, cap_kbit=5)}
    out = apply_byte_caps(rspecs, caps_of(rows))
    assert out["a"]["nm_net_max_rate"] == 1000 and out["b"] is rspecs["b"]
    assert rspecs["a"]["nm_net_max_rate"] == 5000  # the input is not changed
    assert apply_byte_caps(rspecs, {"a": 50})["a"]["nm_net_max_rate"] == 100  # never below the minimum
    assert apply_byte_caps(rspecs, {"a": 10**6})["a"]["nm_net_max_rate"] == 5000  # never above its own
