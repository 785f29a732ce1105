"""The pure rules of PLCAPI's OpenPGP tickets: ``core.tickets.check_plc_ticket``.

No signature, no store: a :class:`PlcTicket` of validated slivers, a clock value, the caller, and
lookups standing in for the store's replay marks and records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemanager.core.authz import Caller
from nodemanager.core.errors import TicketReason, TicketRejected
from nodemanager.core.records import (
    DELEGATED,
    NM_CONTROLLER,
    PLC_INSTANTIATED,
    SOURCE_AUTHORITY,
    SOURCE_TICKET,
    Sliver,
)
from nodemanager.core.tickets import PlcTicket, check_plc_ticket, named_controllers

NOW = 1_700_000_000
MAX_AGE = 86400
SKEW = 300
CTRL = "site_ctrl"

ROOT = Caller(uid=0, is_root=True, local_account=True, sliver=None, is_controller=False)
CONTROLLER = Caller(uid=1001, is_root=False, local_account=True, sliver=CTRL, is_controller=True)
OTHER = Caller(uid=1002, is_root=False, local_account=True, sliver="site_other", is_controller=True)
NOT_A_CONTROLLER = Caller(uid=1003, is_root=False, local_account=True, sliver=CTRL, is_controller=False)
STRANGER = Caller(uid=1004, is_root=False, local_account=True, sliver=None, is_controller=False)


def sliver(name: str = "site_deleg", *, controller: str | None = CTRL, tag: str = "delegations",
           instantiation: str = DELEGATED, expires: int = NOW + 3600, stamp: int = NOW - 10) -> Sliver:
    attributes: tuple[tuple[str, str], ...] = (("nm_cpu_share", "4"),)
    if controller is not None:
        attributes += ((tag, controller),)
    return Sliver(name=name, slice_id=42, instantiation=instantiation, expires=expires, timestamp=stamp,
                  source=SOURCE_AUTHORITY, attributes=attributes, controller=(controller or "").split(",")[0])


def check(*slivers: Sliver, stamp: int = NOW - 10, caller: Caller = CONTROLLER, now: int = NOW,
          marks: Mapping[str, int] | None = None, held: Mapping[str, Sliver] | None = None) -> tuple[Sliver, ...]:
    marks, held = marks or {}, held or {}
    return check_plc_ticket(PlcTicket(stamp, slivers or (sliver(stamp=stamp),)), now=now, max_age=MAX_AGE,
                            max_clock_skew=SKEW, caller=caller, last_issued=marks.get, existing=held.get)


def refused(reason: TicketReason, *slivers: Sliver, **kwargs: object) -> str:
    with pytest.raises(TicketRejected) as caught:
        check(*slivers, **kwargs)  # type: ignore[arg-type]
    assert caught.value.reason is reason, str(caught.value)
    assert caught.value.fault_code == 102
    return str(caught.value)


def test_the_record_is_ticket_sourced_stamped_and_keeps_the_slivers_expiry() -> None:
    (record,) = check()
    assert record == replace(sliver(), source=SOURCE_TICKET, timestamp=NOW - 10, controller=CTRL)
    assert record.expires == NOW + 3600


# --- age and skew --------------------------------------------------------------------------------


@pytest.mark.parametrize(("stamp", "ok"), [
    (NOW - MAX_AGE, True), (NOW - MAX_AGE - 1, False), (NOW + SKEW, True), (NOW + SKEW + 1, False), (NOW, True),
])
def test_timestamp_window(stamp: int, ok: bool) -> None:
    if ok:
        assert check(sliver(stamp=stamp), stamp=stamp)[0].timestamp == stamp
    else:
        reason = TicketReason.TOO_OLD if stamp < NOW else TicketReason.NOT_YET_VALID
        refused(reason, sliver(stamp=stamp), stamp=stamp)


@given(age=st.integers(min_value=-10**6, max_value=10**6))
def test_age_rule_is_exactly_the_window(age: int) -> None:
    stamp = NOW - age
    try:
        check(sliver(stamp=stamp), stamp=stamp)
    except TicketRejected as exc:
        assert age > MAX_AGE or age < -SKEW, str(exc)
    else:
        assert -SKEW <= age <= MAX_AGE


# --- per sliver ----------------------------------------------------------------------------------


def test_an_expired_sliver_is_refused() -> None:
    refused(TicketReason.EXPIRED, sliver(expires=NOW))
    assert check(sliver(expires=NOW + 1))


@pytest.mark.parametrize("instantiation", [PLC_INSTANTIATED, NM_CONTROLLER])
def test_only_delegated_slivers(instantiation: str) -> None:
    refused(TicketReason.WRONG_INSTANTIATION, sliver(instantiation=instantiation))


def test_an_invalid_slice_name_is_refused() -> None:
    refused(TicketReason.INVALID_NAME, sliver("root"))


def test_an_invalid_controller_name_is_refused() -> None:
    refused(TicketReason.INVALID_CONTROLLER, sliver(controller=f"{CTRL},Bad Name!"))


# --- the caller ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["delegations", "controller"])
def test_the_named_controller_may_deliver(tag: str) -> None:
    assert check(sliver(controller=CTRL, tag=tag))[0].controller == CTRL


def test_any_of_several_delegations_may_deliver_and_is_recorded() -> None:
    (record,) = check(sliver(controller=f"site_other, {CTRL}"))
    assert record.controller == CTRL
    assert check(sliver(controller=f"site_other, {CTRL}"), caller=OTHER)[0].controller == "site_other"
    assert named_controllers(sliver(controller=f" a_b ,, {CTRL},a_b")) == ("a_b", CTRL)


@pytest.mark.parametrize("caller", [OTHER, NOT_A_CONTROLLER, STRANGER],
                         ids=["another-controller", "not-an-nm-controller", "no-sliver"])
def test_a_wrong_caller_is_refused(caller: Caller) -> None:
    assert "wrong caller" in refused(TicketReason.WRONG_CALLER, caller=caller)


def test_the_controller_from_the_record_the_node_holds() -> None:
    held = {"site_deleg": sliver(stamp=NOW - 20)}
    (record,) = check(sliver(controller=None), held=held)
    assert record.controller == CTRL
    refused(TicketReason.WRONG_CALLER, sliver(controller=None), held=held, caller=OTHER)


def test_the_tickets_own_tag_wins_over_the_record_the_node_holds() -> None:
    held = {"site_deleg": replace(sliver(stamp=NOW - 20), controller="site_other")}
    message = refused(TicketReason.WRONG_CALLER, sliver(controller=CTRL), held=held, caller=OTHER)
    assert "(from the ticket)" in message
    assert check(sliver(controller=CTRL), held=held)[0].controller == CTRL


def test_no_controller_anywhere_only_root() -> None:
    refused(TicketReason.WRONG_CALLER, sliver(controller=None))
    assert check(sliver(controller=None), caller=ROOT)[0].controller == ""


def test_root_may_deliver_and_the_first_named_controller_is_recorded() -> None:
    assert check(sliver(controller=f"site_other,{CTRL}"), caller=ROOT)[0].controller == "site_other"
    held = {"site_deleg": sliver(stamp=NOW - 20)}
    assert check(sliver(controller=None), caller=ROOT, held=held)[0].controller == CTRL


# --- replay and staleness ------------------------------------------------------------------------


@pytest.mark.parametrize(("mark", "ok"), [(NOW - 11, True), (NOW - 10, False), (NOW - 5, False)])
def test_replay(mark: int, ok: bool) -> None:
    if ok:
        assert check(marks={"site_deleg": mark})
    else:
        refused(TicketReason.REPLAY, marks={"site_deleg": mark})


@pytest.mark.parametrize(("held_stamp", "source", "ok"), [
    (NOW - 10, SOURCE_AUTHORITY, True), (NOW - 9, SOURCE_AUTHORITY, False), (NOW, SOURCE_TICKET, True),
])
def test_stale(held_stamp: int, source: str, ok: bool) -> None:
    held = {"site_deleg": replace(sliver(stamp=held_stamp), timestamp=held_stamp, source=source)}
    if ok:
        assert check(held=held)
    else:
        refused(TicketReason.STALE, held=held)


# --- several slivers: all or nothing -------------------------------------------------------------


def test_several_slivers_all_granted() -> None:
    records = check(sliver("site_a"), sliver("site_b", controller=f"x_y,{CTRL}"))
    assert [r.name for r in records] == ["site_a", "site_b"]
    assert {r.controller for r in records} == {CTRL}


@pytest.mark.parametrize(("bad", "reason", "extra"), [
    (sliver("site_b", controller="site_other"), TicketReason.WRONG_CALLER, {}),
    (sliver("site_b", expires=NOW - 1), TicketReason.EXPIRED, {}),
    (sliver("site_b", instantiation=PLC_INSTANTIATED), TicketReason.WRONG_INSTANTIATION, {}),
    (sliver("site_b"), TicketReason.REPLAY, {"marks": {"site_b": NOW}}),
    (sliver("site_a"), TicketReason.MALFORMED, {}),
])
def test_one_bad_sliver_refuses_the_whole_ticket(bad: Sliver, reason: TicketReason, extra: dict[str, object]) -> None:
    refused(reason, sliver("site_a"), bad, **extra)  # type: ignore[arg-type]


def test_a_ticket_with_no_sliver_is_malformed() -> None:
    with pytest.raises(TicketRejected) as caught:
        check_plc_ticket(PlcTicket(NOW, ()), now=NOW, max_age=MAX_AGE, max_clock_skew=SKEW, caller=ROOT,
                         last_issued=lambda _: None, existing=lambda _: None)
    assert caught.value.reason is TicketReason.MALFORMED
