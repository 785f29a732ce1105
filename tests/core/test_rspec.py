"""The resource table, PLC aliases, and the loan arithmetic (resources.md)."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.errors import InvalidArgument, InvalidLoans
from nodemanager.core.records import Loan
from nodemanager.core.rspec import (
    DEFAULT_NET_MAX_KBPS,
    LOANABLE,
    MAX_VALUE,
    RESOURCES,
    effective_rspecs,
    rspec_from_attributes,
    validate_loans,
)

# --- the table ------------------------------------------------------------------------------


def test_table_matches_resources_md() -> None:
    expected = {
        # name: (default, minimum, loanable)
        "nm_enabled": (1, 0, False),
        "nm_cpu_share": (1, 1, True),
        "nm_cpu_guaranteed_share": (0, 0, True),
        "nm_memory_max": (0, 0, False),
        "nm_net_min_rate": (0, 0, True),
        "nm_net_max_rate": (DEFAULT_NET_MAX_KBPS, 8, True),
        "nm_net_share": (1, 1, True),
        "nm_disk_quota": (5 * 1024 * 1024, 0, False),
        "nm_pids_max": (1024, 16, False),
        "nm_cpu_cores": (0, 0, False),  # PLC's cpu_cores "N"/"Nb" (core.cores)
        "nm_cpu_cores_besteffort": (0, 0, False),
    }
    assert {n: (s.default, s.minimum, s.loanable) for n, s in RESOURCES.items()} == expected
    assert all(spec.name == name for name, spec in RESOURCES.items())
    assert LOANABLE == {n for n, (_, _, loanable) in expected.items() if loanable}


def test_resource_spec_is_frozen() -> None:
    with pytest.raises(AttributeError):
        RESOURCES["nm_cpu_share"].default = 5  # type: ignore[misc]


# --- rspec_from_attributes ------------------------------------------------------------------


def test_no_attributes_gives_defaults() -> None:
    assert rspec_from_attributes(()) == {n: s.default for n, s in RESOURCES.items()}


def test_result_is_a_fresh_dict_every_time() -> None:
    first = rspec_from_attributes(())
    first["nm_cpu_share"] = 99
    assert rspec_from_attributes(())["nm_cpu_share"] == 1


def test_nm_names_are_read() -> None:
    rspec = rspec_from_attributes(
        [("nm_cpu_share", "4"), ("nm_memory_max", "1048576"), ("nm_enabled", "0")]
    )
    assert rspec["nm_cpu_share"] == 4
    assert rspec["nm_memory_max"] == 1048576
    assert rspec["nm_enabled"] == 0


@pytest.mark.parametrize(
    ("tag", "value", "resource", "expected"),
    [
        ("cpu_share", "3", "nm_cpu_share", 3),
        ("cpu_pct", "25", "nm_cpu_guaranteed_share", 250),
        ("net_min_rate", "100", "nm_net_min_rate", 100),
        ("net_max_rate", "2000", "nm_net_max_rate", 2000),
        ("net_share", "7", "nm_net_share", 7),
        ("disk_max", "1000000", "nm_disk_quota", 1000000),
    ],
)
def test_plc_aliases(tag: str, value: str, resource: str, expected: int) -> None:
    rspec = rspec_from_attributes([(tag, value)])
    assert rspec[resource] == expected
    assert tag not in rspec


@pytest.mark.parametrize("order", ["nm_first", "alias_first"])
def test_nm_name_wins_over_alias_in_any_order(order: str) -> None:
    pairs = [("nm_cpu_share", "5"), ("cpu_share", "9")]
    if order == "alias_first":
        pairs.reverse()
    assert rspec_from_attributes(pairs)["nm_cpu_share"] == 5


def test_unparsable_nm_value_lets_alias_apply() -> None:
    assert (
        rspec_from_attributes([("nm_cpu_share", "lots"), ("cpu_share", "3")])["nm_cpu_share"] == 3
    )


@pytest.mark.parametrize("value", ["", "abc", "2.5", "1_000", "٣", "0x10", "1e3", "9" * 40])
def test_unparsable_values_take_the_default(value: str) -> None:
    assert rspec_from_attributes([("nm_net_share", value)])["nm_net_share"] == 1


def test_whitespace_around_numbers_is_accepted() -> None:
    assert rspec_from_attributes([("nm_net_share", " 12 ")])["nm_net_share"] == 12


def test_repeated_tag_last_parsable_value_counts() -> None:
    rspec = rspec_from_attributes(
        [("nm_cpu_share", "2"), ("nm_cpu_share", "6"), ("nm_cpu_share", "x")]
    )
    assert rspec["nm_cpu_share"] == 6


def test_values_are_clamped_to_minimum() -> None:
    rspec = rspec_from_attributes(
        [
            ("nm_cpu_share", "0"),
            ("nm_net_max_rate", "1"),
            ("nm_memory_max", "-5"),
            ("cpu_pct", "-1"),
        ]
    )
    assert rspec["nm_cpu_share"] == 1
    assert rspec["nm_net_max_rate"] == 8
    assert rspec["nm_memory_max"] == 0
    assert rspec["nm_cpu_guaranteed_share"] == 0


def test_values_are_clamped_to_xmlrpc_int() -> None:
    assert rspec_from_attributes([("nm_disk_quota", str(2**40))])["nm_disk_quota"] == MAX_VALUE


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("1", 1), ("7", 1), ("-3", 0)])
def test_enabled_is_a_flag(value: str, expected: int) -> None:
    assert rspec_from_attributes([("nm_enabled", value)])["nm_enabled"] == expected


def test_net_max_rate_defaults_to_node_cap_and_never_exceeds_it() -> None:
    assert rspec_from_attributes((), node_cap_kbps=5000)["nm_net_max_rate"] == 5000
    assert (
        rspec_from_attributes([("net_max_rate", "9000")], node_cap_kbps=5000)["nm_net_max_rate"]
        == 5000
    )
    assert (
        rspec_from_attributes([("nm_net_max_rate", "100")], node_cap_kbps=5000)["nm_net_max_rate"]
        == 100
    )
    assert rspec_from_attributes([("nm_net_max_rate", "90000000")])["nm_net_max_rate"] == 90000000


@pytest.mark.parametrize("cap", [None, 0, -1])
def test_no_cap_means_large_default(cap: int | None) -> None:
    assert rspec_from_attributes((), node_cap_kbps=cap)["nm_net_max_rate"] == DEFAULT_NET_MAX_KBPS


def test_unknown_tags_are_ignored() -> None:
    rspec = rspec_from_attributes([("vsys", "pl_netflow"), ("hrn", "a.b"), ("initscript", "x")])
    assert rspec == rspec_from_attributes(())


# --- validate_loans -------------------------------------------------------------------------


def test_valid_loans_become_loan_values() -> None:
    loans = validate_loans([["site_b", "nm_cpu_share", 2], ("site_c", "nm_net_min_rate", 0)])
    assert loans == (Loan("site_b", "nm_cpu_share", 2), Loan("site_c", "nm_net_min_rate", 0))
    assert validate_loans([]) == ()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("site_b nm_cpu_share 2", "array"),
        ({"site_b": 1}, "array"),
        (None, "array"),
        ([["site_b", "nm_cpu_share"]], "loan 0"),
        ([["site_b", "nm_cpu_share", 1, 2]], "loan 0"),
        (["abc"], "loan 0"),
        ([["site_b", "nm_cpu_share", 1], ["../x", "nm_cpu_share", 1]], "loan 1: recipient"),
        ([["root", "nm_cpu_share", 1]], "recipient"),
        ([[7, "nm_cpu_share", 1]], "recipient"),
        ([["site_b", "nm_memory_max", 1]], "resource"),
        ([["site_b", "nm_enabled", 1]], "resource"),
        ([["site_b", "bogus", 1]], "resource"),
        ([["site_b", 3, 1]], "resource"),
        ([["site_b", "nm_cpu_share", True]], "amount"),
        ([["site_b", "nm_cpu_share", 1.0]], "amount"),
        ([["site_b", "nm_cpu_share", "1"]], "amount"),
        ([["site_b", "nm_cpu_share", -1]], "negative"),
    ],
)
def test_invalid_loans_are_rejected_with_reason(raw: object, fragment: str) -> None:
    with pytest.raises(InvalidLoans, match=fragment) as caught:
        validate_loans(raw)
    assert isinstance(caught.value, InvalidArgument)


# --- effective_rspecs: examples -------------------------------------------------------------


def _own(**values: int) -> dict[str, int]:
    rspec = rspec_from_attributes(())
    rspec.update(values)
    return rspec


def test_loan_moves_amount_from_lender_to_recipient() -> None:
    rspecs = {"site_a": _own(nm_cpu_share=10), "site_b": _own()}
    result = effective_rspecs(rspecs, {"site_a": [Loan("site_b", "nm_cpu_share", 4)]})
    assert result["site_a"]["nm_cpu_share"] == 6
    assert result["site_b"]["nm_cpu_share"] == 5
    assert rspecs["site_a"]["nm_cpu_share"] == 10  # inputs untouched


def test_loan_that_would_break_the_minimum_has_no_effect_but_later_ones_may() -> None:
    rspecs = {"site_a": _own(nm_cpu_share=5), "site_b": _own(), "site_c": _own()}
    loans = {
        "site_a": [
            Loan("site_b", "nm_cpu_share", 3),  # residual 2: ok
            Loan("site_c", "nm_cpu_share", 2),  # residual 0 < 1: not in effect
            Loan("site_c", "nm_cpu_share", 1),  # residual 1: ok
        ]
    }
    result = effective_rspecs(rspecs, loans)
    assert [result[n]["nm_cpu_share"] for n in ("site_a", "site_b", "site_c")] == [1, 4, 2]


def test_received_loans_do_not_count_towards_lending() -> None:
    rspecs = {"site_a": _own(nm_cpu_share=1), "site_b": _own(nm_cpu_share=5), "site_c": _own()}
    loans = {
        "site_b": [Loan("site_a", "nm_cpu_share", 4)],
        "site_a": [Loan("site_c", "nm_cpu_share", 3)],  # site_a owns 1: cannot pass on b's gift
    }
    result = effective_rspecs(rspecs, loans)
    assert [result[n]["nm_cpu_share"] for n in ("site_a", "site_b", "site_c")] == [5, 1, 1]


def test_ineffective_loans() -> None:
    rspecs = {"site_a": _own(nm_cpu_share=10, nm_memory_max=100), "site_b": _own()}
    loans = {
        "site_a": [
            Loan("site_zz", "nm_cpu_share", 1),  # no such recipient
            Loan("site_b", "nm_memory_max", 10),  # not loanable
            Loan("site_b", "nm_cpu_share", -2),  # negative
            Loan("site_a", "nm_cpu_share", 3),  # to itself
        ],
        "site_gone": [Loan("site_b", "nm_cpu_share", 3)],  # lender does not exist
    }
    assert effective_rspecs(rspecs, loans) == rspecs


def test_net_max_rate_keeps_its_minimum_of_eight() -> None:
    rspecs = {"site_a": _own(nm_net_max_rate=100), "site_b": _own(nm_net_max_rate=100)}
    assert effective_rspecs(rspecs, {"site_a": [Loan("site_b", "nm_net_max_rate", 93)]}) == rspecs
    result = effective_rspecs(rspecs, {"site_a": [Loan("site_b", "nm_net_max_rate", 92)]})
    assert result["site_a"]["nm_net_max_rate"] == 8


# --- effective_rspecs: properties -----------------------------------------------------------

NAMES = ["site_a", "site_b", "site_c", "site_d"]
RESOURCE_NAMES = sorted(RESOURCES)

rspec_values = st.fixed_dictionaries(
    {
        name: st.integers(min_value=spec.minimum, max_value=spec.minimum + 50)
        for name, spec in RESOURCES.items()
    }
)
rspecs_strategy = st.dictionaries(st.sampled_from(NAMES), rspec_values, max_size=4)
loan_strategy = st.builds(
    Loan,
    recipient=st.sampled_from([*NAMES, "site_missing"]),
    resource=st.sampled_from(RESOURCE_NAMES),
    amount=st.integers(min_value=-5, max_value=60),
)
loans_strategy = st.dictionaries(
    st.sampled_from([*NAMES, "site_missing"]), st.lists(loan_strategy, max_size=6), max_size=5
)


def _assert_conserved(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> None:
    """Shared assertions: totals preserved, nothing negative."""
    for resource in RESOURCE_NAMES:
        assert sum(r[resource] for r in before.values()) == sum(r[resource] for r in after.values())
    assert all(value >= 0 for rspec in after.values() for value in rspec.values())


@settings(max_examples=300, deadline=None)
@given(rspecs_strategy, loans_strategy)
def test_totals_preserved_and_never_negative(rspecs: dict, loans: dict) -> None:
    result = effective_rspecs(rspecs, loans)
    assert set(result) == set(rspecs)
    _assert_conserved(rspecs, result)


@settings(max_examples=300, deadline=None)
@given(rspecs_strategy, loans_strategy)
def test_no_sliver_ends_below_a_minimum(rspecs: dict, loans: dict) -> None:
    """effective = own - lent + received, received >= 0, so own - lent >= minimum implies this."""
    result = effective_rspecs(rspecs, loans)
    for rspec in result.values():
        assert all(rspec[r] >= RESOURCES[r].minimum for r in RESOURCE_NAMES)


@settings(max_examples=300, deadline=None)
@given(rspecs_strategy.filter(lambda r: "site_a" in r), st.lists(loan_strategy, max_size=8))
def test_single_lender_keeps_its_minimum(rspecs: dict, lender_loans: list) -> None:
    """With one lender, its effective value is exactly own - lent_in_effect."""
    result = effective_rspecs(rspecs, {"site_a": lender_loans})
    for resource in RESOURCE_NAMES:
        lent = rspecs["site_a"][resource] - result["site_a"][resource]
        assert lent >= 0
        assert rspecs["site_a"][resource] - lent >= RESOURCES[resource].minimum
        if not RESOURCES[resource].loanable:
            assert lent == 0


@settings(max_examples=300, deadline=None)
@given(rspecs_strategy, loans_strategy)
def test_lent_amount_never_exceeds_residual(rspecs: dict, loans: dict) -> None:
    """Recompute, loan by loan, which loans are in effect and check the lender's residual."""
    result = effective_rspecs(rspecs, loans)
    expected = {name: dict(own) for name, own in rspecs.items()}
    for lender in sorted(loans):
        if lender not in rspecs:
            continue
        residual = dict(rspecs[lender])
        for loan in loans[lender]:
            ok = (
                loan.recipient in rspecs
                and loan.recipient != lender
                and RESOURCES[loan.resource].loanable
                and loan.amount >= 0
                and residual[loan.resource] - loan.amount >= RESOURCES[loan.resource].minimum
            )
            if ok:
                residual[loan.resource] -= loan.amount
                expected[lender][loan.resource] -= loan.amount
                expected[loan.recipient][loan.resource] += loan.amount
        assert all(residual[r] >= RESOURCES[r].minimum for r in RESOURCE_NAMES)
    assert result == expected


@settings(max_examples=200, deadline=None)
@given(rspecs_strategy, loans_strategy)
def test_loans_to_or_from_missing_slivers_have_no_effect(rspecs: dict, loans: dict) -> None:
    only_present = {
        lender: [loan for loan in lender_loans if loan.recipient in rspecs]
        for lender, lender_loans in loans.items()
        if lender in rspecs
    }
    assert effective_rspecs(rspecs, loans) == effective_rspecs(rspecs, only_present)


@settings(max_examples=200, deadline=None)
@given(rspecs_strategy, loans_strategy, st.randoms(use_true_random=False))
def test_result_independent_of_insertion_order(rspecs: dict, loans: dict, rnd) -> None:
    rspec_items = list(rspecs.items())
    loan_items = list(loans.items())
    rnd.shuffle(rspec_items)
    rnd.shuffle(loan_items)
    assert effective_rspecs(dict(rspec_items), dict(loan_items)) == effective_rspecs(rspecs, loans)
