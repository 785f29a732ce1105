"""The observer role through the API (api.md "Observer", docs/observer.md): the seed's
``del_snoop``, a delegate "allowed to spy on everyone's RSpec".

Real parts as in test_methods: a temporary Store, the hollow backend, real SliverOperations and
WorkerPool, callers resolved from uids by ``caller_resolver`` with a fake password database whose
entries have names (``api.observers`` names accounts). Faults are checked through
``api.faults.to_fault``, as the transport converts them.
"""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodemanager.api.faults import to_fault
from nodemanager.api.identity import TRANSPORT_TCP, TRANSPORT_UNIX, PeerIdentity
from nodemanager.api.methods import NodeManagerApi, caller_resolver
from nodemanager.backends.hollow import FIRST_UID, HollowBackend
from nodemanager.core.authz import OBSERVER_METHODS, Caller
from nodemanager.core.errors import NodeManagerError
from nodemanager.core.records import (
    DELEGATED,
    NM_CONTROLLER,
    OBSERVER_TAG,
    PLC_INSTANTIATED,
    SOURCE_AUTHORITY,
    SOURCE_TICKET,
    Loan,
    Sliver,
)
from nodemanager.operations import SliverOperations
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.workers import WorkerPool

MONITOR_UID, MONITOR = 1600, "monitor"   # a local account named in api.observers
PLAIN_UID, PLAIN = 1601, "plainuser"     # a local account that is not
OBS, OBSCTL, PLC, CTL, DEL, TKT = "site_obs", "site_obsctl", "site_plc", "site_ctl", "site_del", "site_tkt"
OBSERVER_TAGGED = ((OBSERVER_TAG, "1"),)
DENIED_TAIL = "observers may call only GetXIDs, GetSSHKeys, GetRSpec, GetEffectiveRSpec, GetLoans"


@dataclass(frozen=True)
class Entry:
    """What the password database answers: only ``name`` matters to the resolver."""

    name: str
    uid: int


def getpwuid(uid: int) -> Entry | None:
    if uid == 0:
        return Entry("root", 0)
    if uid == MONITOR_UID:
        return Entry(MONITOR, uid)
    if uid == PLAIN_UID:
        return Entry(PLAIN, uid)
    if uid >= FIRST_UID:
        return Entry(f"sliver{uid}", uid)
    return None


def record(name: str, slice_id: int, instantiation: str, *, controller: str = "", source: str = SOURCE_AUTHORITY,
           attributes: tuple[tuple[str, str], ...] = ()) -> Sliver:
    return Sliver(name=name, slice_id=slice_id, instantiation=instantiation, expires=2**31 - 1, timestamp=1,
                  source=source, keys=(f"ssh-ed25519 AAAA {name}",), attributes=attributes, controller=controller)


RECORDS = (
    record(OBS, 1, PLC_INSTANTIATED, attributes=OBSERVER_TAGGED),
    record(OBSCTL, 2, NM_CONTROLLER, attributes=(("nm_cpu_share", "2"), (OBSERVER_TAG, "1"))),
    record(PLC, 3, PLC_INSTANTIATED, attributes=(("nm_cpu_share", "7"),)),
    record(CTL, 4, NM_CONTROLLER),
    record(DEL, 5, DELEGATED, controller=OBSCTL),
)


@dataclass
class Node:
    store: Store
    backend: HollowBackend
    ops: SliverOperations
    api: NodeManagerApi

    def uid(self, name: str) -> int:
        state = self.store.account(name)
        assert state is not None and state.uid is not None
        return state.uid

    def call(self, method: str, *params: Any, uid: int | None = 0) -> Any:
        result = self.api.dispatch(method, params, PeerIdentity(TRANSPORT_UNIX, uid))
        xmlrpc.client.dumps((result,), methodresponse=True)
        return result

    def fault(self, method: str, *params: Any, uid: int | None = 0) -> xmlrpc.client.Fault:
        with pytest.raises(NodeManagerError) as info:
            self.api.dispatch(method, params, PeerIdentity(TRANSPORT_UNIX, uid))
        return to_fault(info.value, method=method)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    store = Store(tmp_path / "nm.db")
    backend = HollowBackend()
    pool = WorkerPool(2)
    ops = SliverOperations(store, backend, ManualClock(), node_cap_kbps=lambda: 100_000)
    api = NodeManagerApi(store=store, pool=pool, operations=ops,
                         resolve_caller=caller_resolver(store, getpwuid, [MONITOR]),
                         node_cap_kbps=lambda: 100_000, operation_timeout=10.0)
    store.apply_records(RECORDS, [])
    for sliver in RECORDS:
        if sliver.instantiation != DELEGATED:
            ops.ensure(sliver)
    try:
        yield Node(store, backend, ops, api)
    finally:
        pool.shutdown(timeout=10)
        store.close()


# --- the resolver --------------------------------------------------------------------------------
def test_the_resolver_marks_observers(node: Node) -> None:
    resolve = caller_resolver(node.store, getpwuid, [MONITOR])
    obs, obsctl, plc, ctl = (node.uid(n) for n in (OBS, OBSCTL, PLC, CTL))
    assert resolve(PeerIdentity(TRANSPORT_UNIX, obs)) == Caller(obs, False, True, OBS, False, True)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, obsctl)) == Caller(obsctl, False, True, OBSCTL, True, True)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, plc)) == Caller(plc, False, True, PLC, False, False)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, ctl)) == Caller(ctl, False, True, CTL, True, False)
    assert resolve(PeerIdentity(TRANSPORT_TCP, MONITOR_UID)) == Caller(MONITOR_UID, False, True, None, False, True)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, PLAIN_UID)) == Caller(PLAIN_UID, False, True, None, False, False)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, 0)).is_observer is False
    assert resolve(PeerIdentity(TRANSPORT_TCP, None)).is_observer is False
    # without api.observers (the default) the monitor is a plain local account
    assert caller_resolver(node.store, getpwuid)(PeerIdentity(TRANSPORT_UNIX, MONITOR_UID)).is_observer is False


def test_a_name_in_api_observers_counts_only_for_the_account_of_that_name(node: Node) -> None:
    """The list names accounts: a uid the password database does not know is nobody's, and a
    sliver's account is an observer through the list only when its own account name is listed."""
    resolve = caller_resolver(node.store, getpwuid, [MONITOR, f"sliver{node.uid(PLC)}"])
    assert resolve(PeerIdentity(TRANSPORT_UNIX, 4242)).is_observer is False
    assert resolve(PeerIdentity(TRANSPORT_UNIX, node.uid(PLC))).is_observer is True
    assert resolve(PeerIdentity(TRANSPORT_UNIX, node.uid(CTL))).is_observer is False


# --- what an observer may do ---------------------------------------------------------------------
@pytest.mark.parametrize("who", [OBS, OBSCTL, MONITOR])
def test_an_observer_reads_every_sliver(node: Node, who: str) -> None:
    uid = MONITOR_UID if who == MONITOR else node.uid(who)
    node.call("SetLoans", PLC, [[CTL, "nm_cpu_share", 2]], uid=0)
    for target in (OBS, OBSCTL, PLC, CTL, DEL):
        assert node.call("GetRSpec", target, uid=uid) == node.call("GetRSpec", target, uid=0)
        assert node.call("GetEffectiveRSpec", target, uid=uid) == node.call("GetEffectiveRSpec", target, uid=0)
        assert node.call("GetLoans", target, uid=uid) == node.call("GetLoans", target, uid=0)
    assert node.call("GetRSpec", PLC, uid=uid)["nm_cpu_share"] == 7
    assert node.call("GetLoans", PLC, uid=uid) == [[CTL, "nm_cpu_share", 2]]
    assert node.call("GetXIDs", uid=uid) == node.call("GetXIDs", uid=0)
    assert node.call("GetSSHKeys", uid=uid) == node.call("GetSSHKeys", uid=0)


@pytest.mark.parametrize("who", [OBS, MONITOR])
@pytest.mark.parametrize(
    "method, params",
    [
        ("Start", (PLC,)),
        ("Stop", (PLC,)),
        ("Create", (DEL,)),
        ("Destroy", (DEL,)),
        ("SetLoans", (PLC, [[CTL, "nm_cpu_share", 1]])),
        ("Ticket", ("<ticket/>",)),
    ],
)
def test_an_observer_changes_nothing(node: Node, who: str, method: str, params: tuple[Any, ...]) -> None:
    uid = MONITOR_UID if who == MONITOR else node.uid(who)
    node.call("Start", PLC, uid=0)
    fault = node.fault(method, *params, uid=uid)
    assert fault.faultCode == 108
    assert fault.faultString.startswith("permission denied: ")
    assert fault.faultString.endswith(DENIED_TAIL)
    assert "observer" in fault.faultString.split("the caller is ")[1]
    assert node.backend.is_running(PLC)  # still running: nothing happened
    assert node.backend.account(DEL) is None
    assert node.store.loans().get(PLC, ()) == ()
    state = node.store.account(DEL)
    assert state is None or not state.create_requested


def test_an_observer_sliver_keeps_its_own_rights(node: Node) -> None:
    uid = node.uid(OBS)
    assert node.call("Start", OBS, uid=uid) == 1
    assert node.backend.is_running(OBS)
    assert node.call("SetLoans", OBS, [[PLC, "nm_cpu_share", 1]], uid=uid) == 1
    assert node.store.loans()[OBS] == (Loan(PLC, "nm_cpu_share", 1),)
    assert node.call("Stop", OBS, uid=uid) == 1
    assert not node.backend.is_running(OBS)


def test_a_controller_that_observes_keeps_its_controller_rights(node: Node) -> None:
    uid = node.uid(OBSCTL)
    assert node.call("Create", DEL, uid=uid) == 1
    assert node.call("Start", DEL, uid=uid) == 1
    assert node.backend.is_running(DEL)
    # tickets: authorized as a controller (then refused for want of a redeemer, not 108)
    assert node.fault("Ticket", "<ticket/>", uid=uid).faultCode == 102
    # but no rights over slivers it does not control
    assert node.fault("Stop", PLC, uid=uid).faultCode == 108
    assert node.fault("SetLoans", CTL, [], uid=uid).faultCode == 108


def test_plain_callers_are_not_observers(node: Node) -> None:
    for uid in (PLAIN_UID, node.uid(PLC), node.uid(CTL)):
        fault = node.fault("GetRSpec", OBS, uid=uid)
        assert fault.faultCode == 108 and "observers may" not in fault.faultString
    assert node.fault("GetRSpec", PLC, uid=4242).faultCode == 108   # unknown uid
    assert node.fault("GetRSpec", PLC, uid=None).faultCode == 108   # no identity


# --- where the role comes from -------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "", "yes", "true", "2"])
def test_a_tag_other_than_1_makes_no_observer(node: Node, value: str) -> None:
    node.store.apply_records([record(OBS, 1, PLC_INSTANTIATED, attributes=((OBSERVER_TAG, value),))], [])
    assert node.fault("GetRSpec", PLC, uid=node.uid(OBS)).faultCode == 108


def test_the_role_follows_the_record_at_once(node: Node) -> None:
    """The resolver caches uid -> sliver name only; the record is read on every call, so the
    authority removing the tag (or setting it) counts from the next call."""
    uid = node.uid(PLC)
    assert node.fault("GetRSpec", OBS, uid=uid).faultCode == 108
    node.store.apply_records([record(PLC, 3, PLC_INSTANTIATED, attributes=OBSERVER_TAGGED)], [])
    assert node.call("GetRSpec", OBS, uid=uid)["nm_enabled"] == 1
    node.store.apply_records([record(PLC, 3, PLC_INSTANTIATED)], [])
    assert node.fault("GetRSpec", OBS, uid=uid).faultCode == 108


def test_a_ticket_does_not_make_an_observer(node: Node) -> None:
    """A ticket-sourced record carrying nm_observer = 1 (a controller delivered it) confers no
    role; the authority's record of the same sliver does."""
    ticketed = record(TKT, 6, DELEGATED, controller=CTL, source=SOURCE_TICKET, attributes=OBSERVER_TAGGED)
    node.store.apply_records([ticketed], [])
    assert node.call("Create", TKT, uid=node.uid(CTL)) == 1
    uid = node.uid(TKT)
    assert node.fault("GetRSpec", PLC, uid=uid).faultCode == 108
    assert node.call("GetRSpec", TKT, uid=uid)["nm_enabled"] == 1  # itself, as any sliver
    node.store.apply_records([record(TKT, 6, DELEGATED, controller=CTL, attributes=OBSERVER_TAGGED)], [])
    assert node.call("GetRSpec", PLC, uid=uid)["nm_cpu_share"] == 7


def test_observer_methods_are_what_the_docs_say() -> None:
    assert OBSERVER_METHODS == ("GetXIDs", "GetSSHKeys", "GetRSpec", "GetEffectiveRSpec", "GetLoans")


def test_build_node_threads_api_observers_to_the_resolver(tmp_path: Path) -> None:
    from nodemanager.config import parse_config
    from nodemanager.core.records import AuthorityDocument
    from nodemanager.daemon import build_node
    from nodemanager.testing.fakehost import FakeHost

    host = FakeHost()
    host.add_user(MONITOR, MONITOR_UID)
    host.add_user(PLAIN, PLAIN_UID)
    config = parse_config({"node": {"data_dir": str(tmp_path / "data"), "log_file": str(tmp_path / "nm.log")},
                           "api": {"tcp": "", "unix_socket": "", "observers": [MONITOR]},
                           "slivers": {"backend": "hollow"}})
    store = Store(tmp_path / "nm.db")
    built = build_node(config, host=host, backend=HollowBackend(), fetch=lambda: (AuthorityDocument(timestamp=1,
                       node_id=None), frozenset()), tickets=None, enforcement=None, store=store)
    try:
        store.apply_records([record(PLC, 3, PLC_INSTANTIATED)], [])
        assert built.api.dispatch("GetRSpec", (PLC,), PeerIdentity(TRANSPORT_UNIX, MONITOR_UID))["nm_enabled"] == 1
        with pytest.raises(NodeManagerError) as info:
            built.api.dispatch("GetRSpec", (PLC,), PeerIdentity(TRANSPORT_UNIX, PLAIN_UID))
        assert to_fault(info.value).faultCode == 108
        with pytest.raises(NodeManagerError) as info:
            built.api.dispatch("SetLoans", (PLC, []), PeerIdentity(TRANSPORT_UNIX, MONITOR_UID))
        assert to_fault(info.value).faultCode == 108
    finally:
        built.pool.shutdown(timeout=10)
        store.close()
