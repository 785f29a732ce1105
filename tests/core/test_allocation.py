"""Properties of the enforcement arithmetic (core/allocation.py), exhaustively with hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.allocation import (
    DEFAULT_MINOR,
    FIRST_SLIVER_MINOR,
    FLOOR_KBIT,
    LAST_SLIVER_MINOR,
    MAX_QUANTUM,
    MTU_QUANTUM,
    ROOT_MINOR,
    V1_WEIGHTS,
    V2_WEIGHTS,
    classid_minors,
    cpu_weights,
    full_contention_permille,
    htb_plan,
    scale_guarantees,
)

names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
scales = st.sampled_from([V1_WEIGHTS, V2_WEIGHTS])


@st.composite
def cpu_inputs(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, int]]:
    slivers = draw(st.lists(names, min_size=0, max_size=12, unique=True))
    shares = {n: draw(st.integers(1, 300)) for n in slivers}
    guarantees = {n: draw(st.integers(0, 1000)) for n in slivers if draw(st.booleans())}
    return shares, guarantees


# --- CPU ------------------------------------------------------------------------------------


def test_shares_map_to_unit_times_share_on_both_versions() -> None:
    v1 = cpu_weights({"a": 1, "b": 3}, {}, V1_WEIGHTS)
    v2 = cpu_weights({"a": 1, "b": 3}, {}, V2_WEIGHTS)
    assert v1.children == {"a": 1024, "b": 3072} and v1.parent == 4096 and v1.notes == ()
    assert v2.children == {"a": 100, "b": 300} and v2.parent == 400


def test_no_slivers_parent_is_an_ordinary_group() -> None:
    assert cpu_weights({}, {}, V1_WEIGHTS).parent == 1024
    assert cpu_weights({}, {}, V2_WEIGHTS).parent == 100


def test_guarantee_against_a_high_share_competitor() -> None:
    result = cpu_weights({"g": 1, "big": 10}, {"g": 600}, V1_WEIGHTS)
    total = 1024 + sum(result.flat.values())
    assert result.flat["big"] == 10240
    assert result.flat["g"] * 1000 >= 600 * total
    assert result.flat["g"] / total < 0.61  # raised just enough, not wildly
    # within the parent alone (the rest of the node idle) it gets even more
    assert result.children["g"] / sum(result.children.values()) > 0.6


def test_oversubscribed_guarantees_are_scaled_and_reported() -> None:
    result = cpu_weights({"a": 1, "b": 1}, {"a": 800, "b": 800}, V1_WEIGHTS)
    assert sum(result.guarantees.values()) <= 996
    assert result.guarantees["a"] == result.guarantees["b"]
    assert any("scaled down" in note for note in result.notes)


@settings(max_examples=400)
@given(cpu_inputs(), scales, st.integers(1, 5000))
def test_cpu_weights_properties(inputs: tuple[dict[str, int], dict[str, int]], scale, other: int) -> None:
    shares, guarantees = inputs
    result = cpu_weights(shares, guarantees, scale, other)
    assert set(result.children) == set(result.flat) == set(shares)
    total = other + sum(result.flat.values())
    budget = 1000 * scale.maximum // (scale.maximum + other)
    assert sum(result.guarantees.values()) <= budget
    asked = sum(guarantees.get(n, 0) for n in shares)
    if asked <= budget:
        assert all(result.guarantees[n] == guarantees.get(n, 0) for n in shares)
    for n in shares:
        assert result.flat[n] >= scale.unit * shares[n]
        assert result.flat[n] * 1000 >= result.guarantees[n] * total
        assert result.guarantees[n] <= max(0, guarantees.get(n, 0))
        if result.guarantees[n] == 0:
            assert result.flat[n] == scale.unit * shares[n]
        assert scale.minimum <= result.children[n] <= scale.maximum
    if max(result.flat.values(), default=0) <= scale.maximum:
        assert result.children == result.flat
    assert scale.minimum <= result.parent <= scale.maximum
    if shares and sum(result.flat.values()) <= scale.maximum:
        assert result.parent == sum(result.flat.values())
    permille = full_contention_permille(result.flat, other)
    assert all(permille[n] >= result.guarantees[n] - 1 for n in shares)


@given(st.dictionaries(names, st.integers(-5, 2000), max_size=10), st.integers(0, 1000))
def test_scale_guarantees(guarantees: dict[str, int], budget: int) -> None:
    scaled, changed = scale_guarantees(guarantees, budget)
    if changed:
        assert sum(scaled.values()) <= budget
    assert all(0 <= scaled[n] <= max(0, g) for n, g in guarantees.items())
    assert changed == (sum(max(0, g) for g in guarantees.values()) > budget)


# --- class ids ------------------------------------------------------------------------------


@given(st.dictionaries(names, st.integers(0, 2**32 - 1), max_size=30))
def test_classid_minors_unique_in_range_and_deterministic(uids: dict[str, int]) -> None:
    minors = classid_minors(uids)
    assert set(minors) == set(uids)
    assert len(set(minors.values())) == len(minors)
    assert all(FIRST_SLIVER_MINOR <= m <= LAST_SLIVER_MINOR for m in minors.values())
    assert classid_minors(dict(reversed(list(uids.items())))) == minors


def test_classid_minor_is_stable_for_ordinary_uids() -> None:
    first = classid_minors({"a": 1001, "b": 1002})
    assert classid_minors({"a": 1001}) == {"a": first["a"]}
    assert first == {"a": FIRST_SLIVER_MINOR + 1001, "b": FIRST_SLIVER_MINOR + 1002}


def test_colliding_uids_are_probed() -> None:
    span = LAST_SLIVER_MINOR - FIRST_SLIVER_MINOR + 1
    minors = classid_minors({"a": 5, "b": 5 + span})
    assert minors == {"a": FIRST_SLIVER_MINOR + 5, "b": FIRST_SLIVER_MINOR + 6}


# --- HTB ------------------------------------------------------------------------------------

net_rspec = st.fixed_dictionaries(
    {
        "nm_net_min_rate": st.integers(0, 50_000),
        "nm_net_max_rate": st.integers(8, 100_000),
        "nm_net_share": st.integers(1, 1000),
    }
)


@settings(max_examples=300)
@given(st.integers(8, 100_000), st.dictionaries(names, net_rspec, max_size=15))
def test_htb_plan_properties(cap: int, rspecs: dict[str, dict[str, int]]) -> None:
    minors = classid_minors({n: i + 2000 for i, n in enumerate(sorted(rspecs))})
    plan = htb_plan(cap, rspecs, minors)
    assert plan.root.minor == ROOT_MINOR and plan.root.rate_kbit == plan.root.ceil_kbit == cap
    assert plan.default.minor == DEFAULT_MINOR and plan.default.ceil_kbit == cap
    assert set(plan.slivers) == set(rspecs)
    scaled = any("minimum rates" in note or "too small" in note for note in plan.notes)
    for name, cls in plan.slivers.items():
        spec = rspecs[name]
        assert cls.minor == minors[name]
        assert FLOOR_KBIT <= cls.rate_kbit <= cls.ceil_kbit <= cap
        assert cls.ceil_kbit == min(cap, spec["nm_net_max_rate"])
        reserved = min(cls.ceil_kbit, max(FLOOR_KBIT, spec["nm_net_min_rate"]))
        if scaled:
            assert cls.rate_kbit <= reserved
        else:
            assert cls.rate_kbit >= reserved
        assert MTU_QUANTUM <= cls.quantum <= MAX_QUANTUM
    rates = plan.default.rate_kbit + sum(c.rate_kbit for c in plan.slivers.values())
    if cap >= FLOOR_KBIT * (len(rspecs) + 1):
        assert rates <= cap
        if not scaled and rspecs:
            # the spare is handed out (up to rounding, one kbit/s per sliver) unless every class is at its ceil
            at_ceil = all(c.rate_kbit == c.ceil_kbit for c in plan.slivers.values())
            assert at_ceil or rates >= cap - len(rspecs)


def test_spare_bandwidth_is_shared_out_by_share_under_the_ceils() -> None:
    rspecs = {"a": {"nm_net_share": 1}, "b": {"nm_net_share": 3}, "c": {"nm_net_share": 4, "nm_net_max_rate": 100}}
    plan = htb_plan(8008 + 8 * 3 + 100, rspecs, {"a": 16, "b": 17, "c": 18})
    assert plan.slivers["c"].rate_kbit == 100
    spare_a, spare_b = plan.slivers["a"].rate_kbit - FLOOR_KBIT, plan.slivers["b"].rate_kbit - FLOOR_KBIT
    assert abs(spare_a * 3 - spare_b) <= 3
    assert plan.slivers["a"].rate_kbit + plan.slivers["b"].rate_kbit >= 8000


@given(st.integers(1, 132), st.integers(1, 132))
def test_quantum_proportional_to_share_for_ordinary_shares(a: int, b: int) -> None:
    plan = htb_plan(10_000, {"a": {"nm_net_share": a}, "b": {"nm_net_share": b}}, {"a": 16, "b": 17})
    assert plan.slivers["a"].quantum * b == plan.slivers["b"].quantum * a


def test_htb_plan_ignores_slivers_without_a_class_and_defaults_ceil_to_cap() -> None:
    plan = htb_plan(8000, {"a": {}, "b": {"nm_net_min_rate": 1000}}, {"a": 0x20})
    assert list(plan.slivers) == ["a"]
    assert plan.slivers["a"].classid == "1:20"
    assert (plan.slivers["a"].rate_kbit, plan.slivers["a"].ceil_kbit) == (8000 - FLOOR_KBIT, 8000)


def test_min_rates_over_the_cap_are_scaled_with_a_note() -> None:
    rspecs = {"a": {"nm_net_min_rate": 6000}, "b": {"nm_net_min_rate": 6000}}
    plan = htb_plan(8000, rspecs, {"a": 16, "b": 17})
    assert plan.slivers["a"].rate_kbit == plan.slivers["b"].rate_kbit
    assert plan.default.rate_kbit + 2 * plan.slivers["a"].rate_kbit <= 8000
    assert plan.notes


def test_full_contention_nested_under_a_parent_group() -> None:
    """Slivers sharing a parent group of weight P against the rest of the node's O: each gets
    P/(P+O) of the node, split by the slivers' weights."""
    assert full_contention_permille({"a": 1, "b": 3}, 1, 3) == {"a": 187, "b": 562}
    assert full_contention_permille({"a": 1, "b": 3}, 1) == {"a": 200, "b": 600}  # flat
    assert full_contention_permille({}, 1, 3) == {}
