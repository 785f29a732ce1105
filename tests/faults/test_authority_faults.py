"""A misbehaving authority changes nothing, the daemon keeps running and answering, and the next
good document is applied (authority.md, "Sync semantics").

Each fault runs against the daemon's real poll loop (hollow backend, API on a Unix socket) and a
real ``AuthorityClient`` over HTTP: one good document first, then the fault while a thread calls
``GetXIDs`` without pause, then a newer good document with a change.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from .conftest import DOC_CAP_BYTES, ApiHammer, FaultyAuthority, RunningNode, slices_xml

NAMES = [f"site_s{i:02d}" for i in range(10)]
GOOD = slices_xml(NAMES, 1000)


def apply_fault(authority: FaultyAuthority, fault: str) -> None:
    if fault == "down":
        authority.down()
    elif fault == "slow":  # beyond authority.timeout (1 s), on every retry
        authority.serve(slices_xml(NAMES, 1500), delay=3.0)
    elif fault == "http-500":
        authority.serve(b"<html>Internal Server Error</html>", status=500)
    elif fault == "truncated":
        body = slices_xml(NAMES + ["site_new"], 1500)
        authority.serve(body[: len(body) * 2 // 3])
    elif fault == "huge":  # a valid document over the cap, announced by Content-Length
        authority.serve(slices_xml(NAMES, 1500, pad=DOC_CAP_BYTES // len(NAMES) + 1))
    elif fault == "huge-streamed":  # the same without Content-Length: the cap hits while reading
        authority.serve(slices_xml(NAMES, 1500, pad=DOC_CAP_BYTES // len(NAMES) + 1), stream=True)
    elif fault == "wrong-node":
        authority.serve(slices_xml(NAMES[:3], 1500, node_id=2))
    elif fault == "not-xml":
        authority.serve(b"\x00\xffgarbage{]")
    else:  # pragma: no cover - a typo in the table below
        raise AssertionError(fault)


#: fault -> the outcome class it must produce (metrics label)
FAULTS = {
    "down": "unavailable",
    "slow": "unavailable",
    "http-500": "unavailable",
    "truncated": "rejected",
    "huge": "rejected",
    "huge-streamed": "rejected",
    "wrong-node": "rejected",
    "not-xml": "rejected",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_bad_authority_changes_nothing_and_the_next_good_document_applies(
    fault: str, authority: FaultyAuthority, make_node: Callable[..., RunningNode]
) -> None:
    authority.serve(GOOD)
    node = make_node(authority.url)
    first = node.start()
    assert first.ok, first.summary()
    assert node.manager.pool.wait_idle(30)
    before = node.snapshot()
    assert set(before.slivers) == set(NAMES) and set(before.observed) == set(NAMES)

    apply_fault(authority, fault)
    with ApiHammer(node.socket_path) as hammer:
        started = time.monotonic()
        outcome = node.cycle()
        elapsed = time.monotonic() - started
        assert hammer.wait_answers(hammer.answers + 3)  # and it still answers after the cycle
    assert not outcome.ok and outcome.result.value == (
        "authority-unavailable" if FAULTS[fault] == "unavailable" else "rejected"), outcome.summary()
    assert node.alive()
    assert node.snapshot() == before  # records, account states and the backend: unchanged
    assert hammer.failures == []
    assert hammer.slowest < 2.0  # answered while the sync waited on the authority
    if fault == "slow":
        assert elapsed >= 2.0  # two attempts of one timeout each: the API was not blocked meanwhile
    assert node.manager.store.get_meta("last_sync_outcome").startswith(f"authority {FAULTS[fault]}")
    label = "authority-unavailable" if FAULTS[fault] == "unavailable" else "rejected"
    assert node.metric("nodemanager_syncs_total", outcome=label) == 1

    # recovery: the authority comes back with a newer document that drops one slice, adds one
    authority.release.set()
    authority.up()
    authority.serve(slices_xml(NAMES[1:] + ["site_added"], 2000))
    recovered = node.cycle()
    assert recovered.ok and recovered.document_timestamp == 2000, recovered.summary()
    after = node.snapshot()
    assert set(after.slivers) == set(NAMES[1:]) | {"site_added"}
    assert set(after.observed) == set(after.slivers)
    # the unchanged slivers kept their accounts (same uid): nothing was created twice
    for name in NAMES[1:]:
        assert after.accounts[name].uid == before.accounts[name].uid
    assert node.metric("nodemanager_syncs_total", outcome="ok") == 2


def test_an_empty_slice_list_trips_the_safety_valve_and_the_valve_holds(
    authority: FaultyAuthority, make_node: Callable[..., RunningNode]
) -> None:
    authority.serve(GOOD)
    node = make_node(authority.url)
    assert node.start().ok
    assert node.manager.pool.wait_idle(30)
    before = node.snapshot()

    authority.serve(slices_xml([], 1500))
    with ApiHammer(node.socket_path) as hammer:
        outcome = node.cycle()
        assert hammer.wait_answers(hammer.answers + 3)
    # a well-formed document: the cycle is "ok", but every removal is held
    assert outcome.ok and outcome.valve_tripped and set(outcome.held) == set(NAMES), outcome.summary()
    assert hammer.failures == []
    after = node.snapshot()
    assert set(after.observed) == set(NAMES) and after.accounts == before.accounts
    assert node.manager.store.valve().held == frozenset(NAMES)
    assert node.metric("nodemanager_safety_valve_trips_total") == 1
    assert node.metric("nodemanager_safety_valve_held_removals") == len(NAMES)

    # the authority recovers before a second empty document confirms: nothing was ever removed
    authority.serve(slices_xml(NAMES, 2000))
    recovered = node.cycle()
    assert recovered.ok and not recovered.held, recovered.summary()
    final = node.snapshot()
    assert set(final.observed) == set(NAMES) and final.accounts == before.accounts
    assert node.manager.store.valve().held == frozenset()


def test_the_safety_valve_gives_way_after_confirm_after_documents(
    authority: FaultyAuthority, make_node: Callable[..., RunningNode]
) -> None:
    """The other side of the valve: a real mass removal is applied once it is confirmed
    (``sync.confirm_after`` = 2 consecutive documents)."""
    authority.serve(GOOD)
    node = make_node(authority.url)
    assert node.start().ok
    authority.serve(slices_xml(NAMES[:2], 1500))
    assert node.cycle().valve_tripped
    assert set(node.snapshot().observed) == set(NAMES)
    authority.serve(slices_xml(NAMES[:2], 1600))
    confirmed = node.cycle()
    assert confirmed.ok and not confirmed.held, confirmed.summary()
    assert set(node.snapshot().observed) == set(NAMES[:2])


def test_a_stale_document_is_ignored(authority: FaultyAuthority, make_node: Callable[..., RunningNode]) -> None:
    authority.serve(GOOD)
    node = make_node(authority.url)
    assert node.start().ok
    before = node.snapshot()
    authority.serve(slices_xml(NAMES[:5], 900))  # older than what the node holds
    outcome = node.cycle()
    assert outcome.ok and outcome.result == "stale"
    assert node.snapshot() == before
    assert node.metric("nodemanager_syncs_total", outcome="stale") == 1
