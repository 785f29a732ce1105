"""NodeManagerApi.dispatch with real parts: a temporary Store, the HollowBackend, real
SliverOperations and WorkerPool. Callers are PeerIdentity values resolved through a fake password
database; errors are checked through ``api.faults.to_fault``, exactly as the transport converts
them.
"""

from __future__ import annotations

import re
import threading
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodemanager.api.deferred import Pending
from nodemanager.api.faults import to_fault
from nodemanager.api.identity import TRANSPORT_TCP, TRANSPORT_UNIX, PeerIdentity
from nodemanager.api.methods import NodeManagerApi, caller_resolver, help_text
from nodemanager.backends.hollow import FIRST_UID, HollowBackend
from nodemanager.core.authz import METHODS, Caller
from nodemanager.core.errors import BackendError, NodeManagerError, TicketReason, TicketRejected
from nodemanager.core.records import DELEGATED, NM_CONTROLLER, PLC_INSTANTIATED, Phase, Sliver
from nodemanager.core.rspec import RESOURCES
from nodemanager.operations import SliverOperations
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.workers import WorkerPool

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"
LOCAL_UID = 1500      # in the password database, but no sliver
STRANGER_UID = 4242   # not in the password database
CAP_KBPS = 100_000

PLC, CTL, CTL2, DEL, OTHER = "site_plc", "site_ctl", "site_ctl2", "site_del", "site_other"


#: Each test sliver's own slice id (the hollow backend derives the account's uid from it).
SLICE_IDS: dict[str, int] = {}


def record(name: str, instantiation: str, *, controller: str = "", keys: tuple[str, ...] = (),
           attributes: tuple[tuple[str, str], ...] = ()) -> Sliver:
    slice_id = SLICE_IDS.setdefault(name, len(SLICE_IDS) + 1)
    return Sliver(name=name, slice_id=slice_id, instantiation=instantiation, expires=2**31 - 1,
                  timestamp=1, keys=keys, attributes=attributes, controller=controller)


RECORDS = (
    record(PLC, PLC_INSTANTIATED, keys=("ssh-ed25519 AAAA plc@a", "ssh-rsa BBBB plc@b"),
           attributes=(("nm_cpu_share", "5"), ("net_max_rate", "999999"), ("bogus", "x"))),
    record(CTL, NM_CONTROLLER, keys=("ssh-ed25519 CCCC ctl",)),
    record(CTL2, NM_CONTROLLER),
    record(DEL, DELEGATED, controller=CTL, keys=("ssh-ed25519 DDDD del",)),
    record(OTHER, PLC_INSTANTIATED),
)
WITH_ACCOUNTS = (PLC, CTL, CTL2, OTHER)


class ScriptedBackend(HollowBackend):
    """The hollow backend, with start failing or blocking on cue."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_start: str = ""
        self.hold_start: threading.Event | None = None
        self.starting = threading.Event()  # set when a start begins

    def start(self, sliver: Sliver) -> None:
        self.starting.set()
        if self.hold_start is not None:
            self.hold_start.wait(10)
        if self.fail_start:
            raise BackendError(f"sliver {sliver.name}: {self.fail_start}")
        super().start(sliver)


@dataclass
class Node:
    store: Store
    backend: ScriptedBackend
    pool: WorkerPool
    ops: SliverOperations
    api: NodeManagerApi
    hook_calls: list[int] = field(default_factory=list)

    def uid(self, name: str) -> int:
        state = self.store.account(name)
        assert state is not None and state.uid is not None
        return state.uid

    def call(self, method: str, *params: Any, uid: int | None = 0, transport: str = TRANSPORT_UNIX) -> Any:
        result = self.api.dispatch(method, params, PeerIdentity(transport, uid))
        xmlrpc.client.dumps((result,), methodresponse=True)  # every answer must marshal
        return result

    def fault(self, method: str, *params: Any, uid: int | None = 0) -> xmlrpc.client.Fault:
        with pytest.raises(NodeManagerError) as info:
            self.api.dispatch(method, params, PeerIdentity(TRANSPORT_UNIX, uid))
        return to_fault(info.value, method=method)


def fake_getpwuid(uid: int) -> object | None:
    return object() if uid in (0, LOCAL_UID) or uid >= FIRST_UID else None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    store = Store(tmp_path / "nm.db")
    backend = ScriptedBackend()
    pool = WorkerPool(2)
    ops = SliverOperations(store, backend, ManualClock(), node_cap_kbps=lambda: CAP_KBPS)
    calls: list[int] = []
    api = NodeManagerApi(
        store=store, pool=pool, operations=ops, resolve_caller=caller_resolver(store, fake_getpwuid),
        node_cap_kbps=lambda: CAP_KBPS, on_loans_changed=lambda: calls.append(1), operation_timeout=10.0,
    )
    store.apply_records(RECORDS, [])
    for sliver in RECORDS:
        if sliver.name in WITH_ACCOUNTS:
            ops.ensure(sliver)
    try:
        yield Node(store, backend, pool, ops, api, calls)
    finally:
        if backend.hold_start is not None:
            backend.hold_start.set()
        pool.shutdown(timeout=10)
        store.close()


# --- dispatch: the checks every call goes through ------------------------------------------------
def test_unknown_method_lists_the_valid_ones(node: Node) -> None:
    fault = node.fault("Shutdown", uid=0)
    assert fault.faultCode == 100
    assert "Shutdown" in fault.faultString
    assert all(name in fault.faultString for name in METHODS)
    # internals of the class are not methods either
    assert node.fault("dispatch", "GetXIDs", (), None).faultCode == 100
    assert node.fault("_record", PLC).faultCode == 100
    assert node.fault("help").faultCode == 100


@pytest.mark.parametrize(
    "method, params",
    [("Help", (1,)), ("GetXIDs", ("x",)), ("Ticket", ()), ("GetRSpec", ()), ("GetRSpec", (PLC, PLC)),
     ("SetLoans", (PLC,)), ("Create", ())],
)
def test_wrong_argument_count(node: Node, method: str, params: tuple[Any, ...]) -> None:
    fault = node.fault(method, *params)
    assert fault.faultCode == 101
    assert f"{len(params)} given" in fault.faultString


@pytest.mark.parametrize("bad", [5, None, ["site_plc"], "Site_Plc", "root", "a" * 40, "../etc", ""])
def test_invalid_sliver_name(node: Node, bad: Any) -> None:
    assert node.fault("GetRSpec", bad).faultCode == 102


@pytest.mark.parametrize("uid", [0, None, STRANGER_UID])
def test_unknown_sliver_is_checked_before_authorization(node: Node, uid: int | None) -> None:
    fault = node.fault("Start", "site_nosuch", uid=uid)
    assert (fault.faultCode, fault.faultString) == (102, "no sliver named 'site_nosuch' on this node")


def test_permission_denied_carries_the_reason(node: Node) -> None:
    fault = node.fault("GetRSpec", DEL, uid=node.uid(OTHER))
    assert fault.faultCode == 108
    assert f"sliver {OTHER}" in fault.faultString and DEL in fault.faultString
    assert node.fault("GetRSpec", PLC, uid=None).faultCode == 108
    assert node.fault("GetRSpec", PLC, uid=node.uid(CTL)).faultCode == 108   # not its controller
    assert node.fault("GetRSpec", DEL, uid=node.uid(CTL2)).faultCode == 108  # another controller
    assert node.fault("GetRSpec", PLC, uid=LOCAL_UID).faultCode == 108


def test_roles_over_dispatch(node: Node) -> None:
    """The role rules through the resolver: self, root, the controller; TCP callers alike."""
    assert node.call("GetRSpec", PLC, uid=node.uid(PLC))["nm_cpu_share"] == 5
    assert node.call("GetRSpec", DEL, uid=node.uid(CTL), transport=TRANSPORT_TCP)["nm_cpu_share"] == 1
    assert node.call("GetRSpec", DEL, uid=0)["nm_enabled"] == 1


# --- caller resolution ---------------------------------------------------------------------------
def test_caller_resolver(node: Node) -> None:
    resolve = caller_resolver(node.store, fake_getpwuid)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, 0)) == Caller(0, True, True, None, False)
    assert resolve(PeerIdentity(TRANSPORT_TCP, None)) == Caller(None, False, False, None, False)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, LOCAL_UID)) == Caller(LOCAL_UID, False, True, None, False)
    stranger = resolve(PeerIdentity(TRANSPORT_UNIX, STRANGER_UID))
    assert stranger == Caller(STRANGER_UID, False, False, None, False)
    ctl = node.uid(CTL)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, ctl)) == Caller(ctl, False, True, CTL, True)
    plc = node.uid(PLC)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, plc)) == Caller(plc, False, True, PLC, False)
    # the cached mapping is re-checked: once the account is gone, the uid is nobody's sliver
    node.ops.destroy(PLC)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, plc)).sliver is None


def test_resolver_ignores_accounts_not_owned(node: Node) -> None:
    from dataclasses import replace

    state = node.store.account(OTHER)
    assert state is not None
    node.store.put_account(replace(state, owned=False))
    resolve = caller_resolver(node.store, fake_getpwuid)
    assert resolve(PeerIdentity(TRANSPORT_UNIX, node.uid(OTHER))).sliver is None


# --- Help ----------------------------------------------------------------------------------------
def test_help_is_one_line_per_method_in_order(node: Node) -> None:
    text = node.call("Help", uid=None)
    lines = text.split("\n")
    assert [line.split("(")[0] for line in lines] == list(METHODS)
    for line, spec in zip(lines, METHODS.values()):
        assert re.fullmatch(rf"{spec.name}\({', '.join(spec.args)}\): \S.*", line), line
    assert lines[-1].startswith("SetLoans(sliver, loans): ")
    assert text == help_text()


def test_help_descriptions_are_the_docstrings() -> None:
    for name in METHODS:
        doc = getattr(NodeManagerApi, name).__doc__
        assert doc and doc.strip().splitlines()[0] in help_text()


def test_every_method_has_a_body_and_no_other_camelcase_method_exists() -> None:
    public = {n for n in vars(NodeManagerApi) if n[:1].isupper()}
    assert public == set(METHODS)


def test_docs_contain_the_help_text_verbatim() -> None:
    text = API_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- help-text -->\n```[a-z]*\n(.*?)\n```", text, re.DOTALL)
    assert match, "docs/api.md has no help-text block"
    assert match.group(1) == help_text()


# --- read-only methods ---------------------------------------------------------------------------
def test_get_xids(node: Node) -> None:
    expected = {name: node.uid(name) for name in WITH_ACCOUNTS}
    assert node.call("GetXIDs", uid=0) == expected
    assert node.call("GetXIDs", uid=LOCAL_UID) == expected
    assert node.call("GetXIDs", uid=node.uid(OTHER)) == expected
    assert node.fault("GetXIDs", uid=None).faultCode == 108
    assert node.fault("GetXIDs", uid=STRANGER_UID).faultCode == 108


def test_get_xids_leaves_out_uids_beyond_32_bits(node: Node) -> None:
    from dataclasses import replace

    state = node.store.account(OTHER)
    assert state is not None
    node.store.put_account(replace(state, uid=2**31))
    assert OTHER not in node.call("GetXIDs")


def test_get_ssh_keys(node: Node) -> None:
    keys = node.call("GetSSHKeys", uid=LOCAL_UID)
    assert keys == {
        PLC: "ssh-ed25519 AAAA plc@a\nssh-rsa BBBB plc@b",
        CTL: "ssh-ed25519 CCCC ctl",
        CTL2: "",
        DEL: "ssh-ed25519 DDDD del",
        OTHER: "",
    }
    assert node.fault("GetSSHKeys", uid=STRANGER_UID).faultCode == 108


def test_get_rspec(node: Node) -> None:
    rspec = node.call("GetRSpec", PLC, uid=node.uid(PLC))
    assert set(rspec) == set(RESOURCES)
    assert rspec["nm_cpu_share"] == 5
    assert rspec["nm_net_max_rate"] == CAP_KBPS  # the PLC alias, capped at the node's cap
    assert node.call("GetEffectiveRSpec", PLC, uid=node.uid(PLC)) == rspec


def test_get_rspec_values_fit_xmlrpc(node: Node) -> None:
    huge = record("site_huge", PLC_INSTANTIATED, attributes=(("nm_disk_quota", "9" * 25),))
    node.store.apply_records([huge], [])
    assert node.call("GetRSpec", "site_huge")["nm_disk_quota"] == 2**31 - 1


# --- Ticket --------------------------------------------------------------------------------------
def test_ticket_without_redeemer(node: Node) -> None:
    for uid in (0, node.uid(CTL)):
        fault = node.fault("Ticket", "<ticket/>", uid=uid)
        assert (fault.faultCode, fault.faultString) == (102, "tickets not configured")
    # authorization comes first
    assert node.fault("Ticket", "<ticket/>", uid=node.uid(OTHER)).faultCode == 108
    assert node.fault("Ticket", "<ticket/>", uid=None).faultCode == 108


class RecordingRedeemer:
    def __init__(self, reject: str = "") -> None:
        self.reject = reject
        self.calls: list[tuple[str, Caller]] = []

    def redeem(self, ticket: str, caller: Caller) -> str:
        self.calls.append((ticket, caller))
        if self.reject:
            raise TicketRejected(TicketReason.EXPIRED, self.reject)
        return DEL


def test_ticket_with_redeemer(node: Node) -> None:
    redeemer = RecordingRedeemer()
    node.api.tickets = redeemer
    assert node.call("Ticket", "<ticket/>", uid=node.uid(CTL)) == 1
    assert redeemer.calls == [("<ticket/>", Caller(node.uid(CTL), False, True, CTL, True))]
    assert node.fault("Ticket", 42, uid=0).faultCode == 102
    redeemer.reject = "ticket expired"
    fault = node.fault("Ticket", "<ticket/>", uid=0)
    assert (fault.faultCode, fault.faultString) == (102, "expired: ticket expired")
    assert len(redeemer.calls) == 2


# --- operations through the workers --------------------------------------------------------------
def test_create_and_destroy_a_delegated_sliver(node: Node) -> None:
    assert node.backend.account(DEL) is None
    assert node.call("Create", DEL, uid=node.uid(CTL)) == 1
    account = node.backend.account(DEL)
    assert account is not None and not account.running and account.keys == ("ssh-ed25519 DDDD del",)
    state = node.store.account(DEL)
    assert state is not None and state.owned and state.create_requested and state.uid == account.uid
    assert state.phase is Phase.STOPPED
    assert node.call("GetXIDs")[DEL] == account.uid
    assert node.call("Create", DEL, uid=node.uid(CTL)) == 1  # idempotent
    assert node.backend.calls["create"] == len(WITH_ACCOUNTS) + 1
    # now the sliver itself is a caller
    assert node.call("GetRSpec", DEL, uid=account.uid)["nm_enabled"] == 1
    assert node.call("Destroy", DEL, uid=account.uid) == 1
    assert node.backend.account(DEL) is None
    assert node.store.account(DEL) is None and node.store.sliver(DEL) is None
    assert node.fault("GetRSpec", DEL).faultCode == 102


@pytest.mark.parametrize("method", ["Create", "Destroy"])
@pytest.mark.parametrize("target", [PLC, CTL])
def test_create_and_destroy_refuse_non_delegated(node: Node, method: str, target: str) -> None:
    fault = node.fault(method, target, uid=0)
    assert fault.faultCode == 104
    assert "only the authority creates non-delegated slivers" in fault.faultString
    assert node.backend.account(target) is not None


def test_create_over_a_foreign_account_fails_with_the_reason(node: Node) -> None:
    node.backend.create(record(DEL, DELEGATED))  # made behind the node manager's back
    fault = node.fault("Create", DEL, uid=node.uid(CTL))
    assert fault.faultCode == 104
    assert "already exists and was not created by the node manager" in fault.faultString
    assert DEL not in node.call("GetXIDs")
    state = node.store.account(DEL)
    assert state is not None and not state.owned and state.phase is Phase.FAILED


def test_create_permission(node: Node) -> None:
    assert node.fault("Create", DEL, uid=node.uid(CTL2)).faultCode == 108
    assert node.fault("Create", DEL, uid=node.uid(OTHER)).faultCode == 108
    assert node.backend.account(DEL) is None
    state = node.store.account(DEL)
    assert state is None or not state.create_requested


def test_start_and_stop(node: Node) -> None:
    uid = node.uid(PLC)
    assert node.call("Start", PLC, uid=uid) == 1
    assert node.backend.is_running(PLC)
    assert node.store.account(PLC).phase is Phase.RUNNING  # type: ignore[union-attr]
    assert node.call("Stop", PLC, uid=uid) == 1
    assert not node.backend.is_running(PLC)
    assert node.store.account(PLC).phase is Phase.STOPPED  # type: ignore[union-attr]


def test_controller_starts_its_delegated_sliver(node: Node) -> None:
    ctl = node.uid(CTL)
    node.call("Create", DEL, uid=ctl)
    assert node.call("Start", DEL, uid=ctl) == 1
    assert node.backend.is_running(DEL)
    assert node.fault("Stop", DEL, uid=node.uid(CTL2)).faultCode == 108
    assert node.backend.is_running(DEL)


def test_start_before_create_fails_with_the_reason(node: Node) -> None:
    fault = node.fault("Start", DEL, uid=node.uid(CTL))
    assert fault.faultCode == 104
    assert "has not been created yet" in fault.faultString


def test_start_of_a_disabled_sliver_is_refused(node: Node) -> None:
    off = record("site_off", PLC_INSTANTIATED, attributes=(("nm_enabled", "0"),))
    node.store.apply_records([off], [])
    node.ops.ensure(off)
    fault = node.fault("Start", "site_off")
    assert fault.faultCode == 104 and "disabled" in fault.faultString


def test_backend_failure_is_fault_104_with_the_reason(node: Node) -> None:
    node.backend.fail_start = "start script exited with status 3"
    fault = node.fault("Start", PLC, uid=node.uid(PLC))
    assert fault.faultCode == 104
    assert fault.faultString == f"sliver {PLC}: start script exited with status 3"
    state = node.store.account(PLC)
    assert state is not None and state.phase is Phase.FAILED and state.failures == 1


def test_operation_timeout_is_fault_104_still_in_progress(node: Node) -> None:
    node.api.operation_timeout = 0.2
    node.backend.hold_start = threading.Event()
    fault = node.fault("Start", PLC)
    assert fault.faultCode == 104 and "still in progress" in fault.faultString
    node.backend.hold_start.set()
    assert node.pool.wait_idle(10)
    assert node.backend.is_running(PLC)  # it went on in the background


def test_operations_after_shutdown_fail_cleanly(node: Node) -> None:
    node.pool.shutdown(timeout=10)
    fault = node.fault("Stop", PLC)
    assert fault.faultCode == 104 and "shutting down" in fault.faultString


def test_concurrent_calls_for_one_sliver_all_answer(node: Node) -> None:
    """Many Start/Stop calls at once, from request threads: every one waits for its own outcome."""
    results: list[Any] = []
    lock = threading.Lock()

    def worker(method: str) -> None:
        value = node.call(method, PLC)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=worker, args=("Start" if i % 2 else "Stop",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [1] * 16


@pytest.mark.parametrize("method", ["Create", "Destroy", "Start", "Stop"])
def test_operations_are_deferred_for_the_server(node: Node, method: str) -> None:
    """dispatch_deferred answers an operation with a Pending once the checks pass (and raises
    as dispatch does when they fail); other methods answer at once."""
    target = DEL if method in ("Create", "Destroy") else PLC
    if method == "Destroy":
        node.call("Create", DEL)
    pending = node.api.dispatch_deferred(method, (target,), PeerIdentity(TRANSPORT_UNIX, 0))
    assert isinstance(pending, Pending)
    assert pending.what == f"{method}({target})" and pending.timeout == node.api.operation_timeout
    assert pending.wait() == 1
    with pytest.raises(NodeManagerError):
        node.api.dispatch_deferred(method, (target,), PeerIdentity(TRANSPORT_UNIX, None))
    assert node.api.dispatch_deferred("GetXIDs", (), PeerIdentity(TRANSPORT_UNIX, 0)) == node.call("GetXIDs")


def test_alternating_start_and_stop_coalesce(node: Node) -> None:
    """While one Start runs, any number of Start/Stop calls leave one operation pending: the
    latest wins and every caller gets its outcome."""
    node.backend.hold_start = threading.Event()
    node.backend.starting.clear()
    before = dict(node.backend.calls)
    root = PeerIdentity(TRANSPORT_UNIX, 0)
    first = node.api.dispatch_deferred("Start", (PLC,), root)
    assert node.backend.starting.wait(10)  # the first Start is running (held)
    later = [node.api.dispatch_deferred("Stop" if i % 2 else "Start", (PLC,), root) for i in range(1, 22)]
    node.backend.hold_start.set()
    assert [p.wait() for p in [first, *later]] == [1] * 22
    ran = {kind: node.backend.calls[kind] - before.get(kind, 0) for kind in ("start", "stop")}
    assert ran == {"start": 1, "stop": 1}  # the held Start, then only the latest (a Stop)
    assert not node.backend.is_running(PLC)


# --- loans (the basics; tests/api/test_loans.py has the rest) -------------------------------------
def test_set_and_get_loans(node: Node) -> None:
    assert node.call("GetLoans", PLC, uid=node.uid(PLC)) == []
    assert node.call("SetLoans", PLC, [[OTHER, "nm_cpu_share", 2]], uid=node.uid(PLC)) == 1
    assert node.hook_calls == [1]
    assert node.call("GetLoans", PLC) == [[OTHER, "nm_cpu_share", 2]]
    assert node.call("GetEffectiveRSpec", OTHER)["nm_cpu_share"] == 3
    fault = node.fault("SetLoans", PLC, "nope")
    assert fault.faultCode == 102
    assert node.fault("SetLoans", PLC, [], uid=node.uid(OTHER)).faultCode == 108
    assert node.call("GetLoans", PLC) == [[OTHER, "nm_cpu_share", 2]]
    assert node.hook_calls == [1]


def test_destroying_a_recipient_tells_the_daemon(node: Node) -> None:
    node.call("Create", DEL)
    node.call("SetLoans", PLC, [[DEL, "nm_cpu_share", 2]])
    assert node.call("GetEffectiveRSpec", PLC)["nm_cpu_share"] == 3
    node.call("Destroy", DEL)
    assert node.hook_calls == [1, 1]
    assert node.call("GetEffectiveRSpec", PLC)["nm_cpu_share"] == 5
    assert node.call("GetLoans", PLC) == [[DEL, "nm_cpu_share", 2]]


def test_a_failing_loans_hook_does_not_fail_the_call(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("enforcer exploded")

    node.api.on_loans_changed = broken
    assert node.call("SetLoans", PLC, [[OTHER, "nm_net_share", 0]]) == 1
    assert node.call("GetLoans", PLC) == [[OTHER, "nm_net_share", 0]]
    assert "loans-hook-failed" in caplog.text
