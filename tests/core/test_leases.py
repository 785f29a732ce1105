"""``core.leases``: the schedule of a reservable node (resources.md "Leases"), with property tests:
never two slivers leased at once, never a frozen system sliver, every boundary hit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.leases import (
    LEASE_CPU_FACTOR,
    Lease,
    LeaseSchedule,
    is_system,
    lease_rspecs,
    refuse_overlaps,
    round_to,
    schedule_from_members,
)

T0 = 1_700_000_000 - 1_700_000_000 % 3600  # a whole hour


def raw(name: str, t_from: int, t_until: int, slice_id: int = 7) -> dict[str, object]:
    return {"slice_id": slice_id, "name": name, "t_from": t_from, "t_until": t_until}


def members(*leases: dict[str, object], policy: str = "lease_or_idle", granularity: int = 3600) -> dict[str, object]:
    return {"reservation_policy": policy, "lease_granularity": granularity, "leases": list(leases)}


def test_rounding_is_to_the_nearest_granularity_as_the_later_node_manager() -> None:
    assert round_to(T0 + 1799, 3600) == T0
    assert round_to(T0 + 1800, 3600) == T0 + 3600  # half-way rounds up
    schedule, problems = schedule_from_members(members(raw("a_x", T0 + 100, T0 + 3500)))
    assert problems == [] and schedule.leases == (Lease("a_x", 7, T0, T0 + 3600),)


def test_a_lease_empty_once_rounded_and_malformed_leases_are_refused_with_reasons() -> None:
    schedule, _ = schedule_from_members(members(
        raw("a_x", T0 + 100, T0 + 200), {"name": "a_y"}, raw("Bad Name", T0, T0 + 3600), "junk",
        raw("a_z", T0, T0 + 3600, slice_id=True)))  # type: ignore[arg-type]
    assert schedule.leases == ()
    reasons = [r.reason for r in schedule.refused]
    assert reasons[0].startswith("empty once rounded")
    assert "t_from" in reasons[1] or "slice_id" in reasons[1]
    assert reasons[2] == "bad or missing sliver name" and reasons[3] == "not a struct"
    assert reasons[4] == "bad or missing slice_id"


def test_overlapping_leases_are_all_refused_and_the_others_kept() -> None:
    schedule, _ = schedule_from_members(members(
        raw("a_x", T0, T0 + 7200), raw("b_y", T0 + 3600, T0 + 10800), raw("c_z", T0 + 10800, T0 + 14400),
        raw("d_w", T0 + 20000, T0 + 25200)))
    assert [l.name for l in schedule.leases] == ["c_z", "d_w"]  # back-to-back with b_y is no overlap
    refused = {r.label.split("@")[0]: r.reason for r in schedule.refused}
    assert set(refused) == {"a_x", "b_y"}
    assert "b_y@" in refused["a_x"] and "a_x@" in refused["b_y"]


def test_policies_and_what_is_frozen() -> None:
    idle, _ = schedule_from_members(members(raw("a_x", T0, T0 + 3600)))
    shared, _ = schedule_from_members(members(raw("a_x", T0, T0 + 3600), policy="lease_or_shared"))
    none, _ = schedule_from_members(members(raw("a_x", T0, T0 + 3600), policy="none"))
    slivers = {"a_x": False, "b_y": False, "sys_s": True}
    assert idle.frozen_at(T0 + 10, slivers) == {"b_y"}
    assert idle.frozen_at(T0 + 3600, slivers) == {"a_x", "b_y"}  # idle outside leases
    assert idle.frozen_at(T0 - 1, slivers) == {"a_x", "b_y"}
    assert shared.frozen_at(T0 + 10, slivers) == {"b_y"}
    assert shared.frozen_at(T0 + 3600, slivers) == set()
    assert none.frozen_at(T0 + 10, slivers) == set() and none.leased_at(T0 + 10) is None
    assert idle.next_boundary(T0 - 5) == T0 and idle.next_boundary(T0) == T0 + 3600
    assert idle.next_boundary(T0 + 3600) is None
    assert idle.next_lease(T0 - 1) == idle.leases[0] and idle.next_lease(T0) is None


def test_absent_or_bad_node_wide_members() -> None:
    schedule, problems = schedule_from_members({})
    assert schedule == LeaseSchedule() and problems == []
    schedule, problems = schedule_from_members({"reservation_policy": "weird", "lease_granularity": 0, "leases": {}})
    assert schedule.policy == "none" and schedule.granularity == 3600 and len(problems) == 3


def test_the_system_tag() -> None:
    assert is_system([("system", "1")]) and is_system([("system", "yes")])
    assert not is_system([("system", "")]) and not is_system([("system", "0")]) and not is_system([])
    assert not is_system([("system", "1"), ("system", "0")])  # the last value counts


def test_plain_values_round_trip() -> None:
    schedule, _ = schedule_from_members(members(raw("a_x", T0, T0 + 3600), raw("b", 1, 0)))
    assert LeaseSchedule.from_dict(schedule.to_dict()) == schedule
    assert LeaseSchedule.from_dict({"leases": [["x"]]}) == LeaseSchedule()
    assert LeaseSchedule.from_dict("junk") == LeaseSchedule()


def test_the_leased_sliver_gets_the_node() -> None:
    rspecs = {"a_x": {"nm_cpu_share": 1, "nm_net_max_rate": 1000, "nm_net_min_rate": 0},
              "b_y": {"nm_cpu_share": 3, "nm_net_max_rate": 1000, "nm_net_min_rate": 0}}
    out = lease_rspecs(rspecs, "a_x", 100_000)
    assert out["a_x"]["nm_cpu_share"] == 3 * LEASE_CPU_FACTOR
    assert out["a_x"]["nm_net_max_rate"] == 100_000 and out["a_x"]["nm_net_min_rate"] > 90_000
    assert out["b_y"] == rspecs["b_y"] and rspecs["a_x"]["nm_cpu_share"] == 1  # inputs untouched
    assert lease_rspecs(rspecs, None, 100) == rspecs and lease_rspecs(rspecs, "gone", 100) == rspecs


# --- properties ---------------------------------------------------------------------------------
NAMES = ["a_x", "b_y", "c_z", "sys_s"]
lease_st = st.builds(raw, st.sampled_from(NAMES), st.integers(0, 50_000), st.integers(0, 50_000))


@settings(max_examples=200, deadline=None)
@given(st.lists(lease_st, max_size=12), st.sampled_from([1, 60, 600, 3600]),
       st.sampled_from(["lease_or_idle", "lease_or_shared"]),
       st.lists(st.integers(-20_000, 70_000), min_size=1, max_size=30))
def test_properties_under_random_leases_and_clock_steps(leases: list[dict[str, object]], granularity: int,
                                                         policy: str, times: list[int]) -> None:
    """Whatever the leases and however the clock jumps (``times`` in any order is a sequence of
    clock steps): at most one lease holds the node; no system sliver is ever frozen; a frozen
    set changes only at a boundary; every accepted lease's boundaries are reported by
    ``next_boundary``."""
    schedule, _ = schedule_from_members(members(*leases, policy=policy, granularity=granularity))
    slivers = {name: name.startswith("sys") for name in NAMES}
    accepted = schedule.leases
    for t in times:
        holding = [l for l in accepted if l.t_from <= t < l.t_until]
        assert len(holding) <= 1
        assert schedule.leased_at(t) == (holding[0] if holding else None)
        frozen = schedule.frozen_at(t, slivers)
        assert "sys_s" not in frozen
        if holding:
            assert holding[0].name not in frozen and frozen == {n for n in NAMES if n not in ("sys_s", holding[0].name)}
        # nothing changes strictly between t and the next boundary
        boundary = schedule.next_boundary(t)
        probe = t + 10**6 if boundary is None else (t + boundary) / 2
        assert schedule.frozen_at(probe, slivers) == frozen
    for lease in accepted:  # every boundary is hit: seen from just before it
        assert lease.t_from % granularity == 0 and lease.t_until % granularity == 0
        assert schedule.next_boundary(lease.t_from - 0.5) == lease.t_from
        assert schedule.next_boundary(lease.t_until - 0.5) == lease.t_until
        assert schedule.leased_at(lease.t_from) == lease and schedule.leased_at(lease.t_until) != lease
    total = len(accepted) + len(schedule.refused)
    assert total == len(leases)
    kept, refused = refuse_overlaps(accepted)
    assert kept == list(accepted) and refused == []  # what is kept never overlaps
