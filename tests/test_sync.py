"""Sync cycles end to end with a real SQLite store and the hollow backend.

The authority is a FakeAuthority (documents set by the test); the authority client itself is
tested over real HTTP in tests/authority.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nodemanager.backends.hollow import HollowBackend
from nodemanager.core.errors import AuthorityUnavailable, BackendError
from nodemanager.core.records import DELEGATED, NOT_INSTANTIATED, SOURCE_TICKET, Phase
from nodemanager import daemon
from nodemanager.config import parse_config
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.fakeauthority import FakeAuthority, make_sliver
from nodemanager.workers import WorkerPool


class FlakyBackend(HollowBackend):
    """The hollow backend, made to fail ``create`` for the names in ``fail_create`` and
    ``destroy`` for those in ``fail_destroy``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_create: set[str] = set()
        self.fail_destroy: set[str] = set()

    def destroy(self, name):  # noqa: ANN001, ANN201
        if name in self.fail_destroy:
            raise BackendError(f"sliver {name}: userdel failed (injected)")
        return super().destroy(name)

    def create(self, sliver):  # noqa: ANN001, ANN201
        if sliver.name in self.fail_create:
            raise BackendError(f"sliver {sliver.name}: useradd failed (injected)")
        return super().create(sliver)


class Node:
    """The node as the daemon builds it (``build_node``: hollow backend, no API), with a fake
    authority, a manual clock, and a backend that outlives restarts (it is the machine)."""

    def __init__(self, data_dir: Path, *, confirm_after: int = 2) -> None:
        self.clock = ManualClock()
        self.authority = FakeAuthority()
        self.backend = FlakyBackend()
        self.config = parse_config({
            "node": {"data_dir": str(data_dir), "log_file": ""},
            "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""},
            "slivers": {"backend": "hollow", "workers": 4}, "sync": {"confirm_after": confirm_after},
        })
        self.node = self._start()

    def _start(self) -> daemon.Node:
        node = daemon.build_node(self.config, backend=self.backend, fetch=self.authority.fetch,
                                 clock=self.clock, tickets=None)
        node.start(serve=False)
        return node

    @property
    def store(self) -> Store:
        return self.node.store

    @property
    def pool(self) -> WorkerPool:
        return self.node.pool

    def sync(self, **kwargs):  # noqa: ANN003, ANN201
        return self.node.sync_once(wait=True, **kwargs)

    def restart(self) -> None:
        """A new process: the deletion gate closes again; store and machine stay."""
        self.node.close()
        self.node = self._start()

    def names(self) -> set[str]:
        return set(self.backend.observe())

    def close(self) -> None:
        self.node.close()


def mutating_calls(backend: HollowBackend) -> dict[str, int]:
    """Backend calls that change the machine (observe and lookup only read)."""
    return {k: v for k, v in backend.calls.items() if k not in ("observe", "lookup", "is_running") and v}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path)
    yield node
    node.close()


def test_full_sync_creates_auto_instantiated_slivers_only(node: Node) -> None:
    node.authority.publish([
        make_sliver("site_alpha"),
        make_sliver("site_beta", instantiation="nm-controller"),
        make_sliver("site_deleg", instantiation=DELEGATED, controller="site_beta"),
        make_sliver("site_off", instantiation=NOT_INSTANTIATED),
    ])
    outcome = node.sync()
    assert outcome.ok
    assert node.names() == {"site_alpha", "site_beta"}
    accounts = node.store.accounts()
    assert accounts["site_alpha"].owned and accounts["site_alpha"].phase is Phase.RUNNING
    assert set(node.store.slivers()) == {"site_alpha", "site_beta", "site_deleg", "site_off"}


def test_noop_sync_makes_no_backend_calls_and_one_change_makes_one(node: Node) -> None:
    node.authority.publish([make_sliver(f"site_s{i}") for i in range(20)])
    node.sync()
    node.backend.calls.clear()
    node.authority.publish([make_sliver(f"site_s{i}") for i in range(20)])  # newer timestamp, same content
    outcome = node.sync()
    assert outcome.actions == [] and outcome.upserts == 0
    assert mutating_calls(node.backend) == {}
    changed = [make_sliver(f"site_s{i}") for i in range(20)]
    changed[7] = make_sliver("site_s7", attributes=[("nm_cpu_share", "4")])
    node.authority.publish(changed)
    outcome = node.sync()
    assert [(a.kind.value, a.name) for a in outcome.actions] == [("configure", "site_s7")]
    assert mutating_calls(node.backend) == {"configure": 1}


def test_removed_sliver_is_destroyed_and_forgotten(node: Node) -> None:
    node.authority.publish([make_sliver(f"site_s{i}") for i in range(4)])
    node.sync()
    node.authority.publish([make_sliver(f"site_s{i}") for i in range(3)])
    node.sync()
    assert "site_s3" not in node.names()
    assert "site_s3" not in node.store.slivers() and "site_s3" not in node.store.accounts()


def test_safety_valve_holds_mass_removal_until_confirmed(node: Node) -> None:
    node.authority.publish([make_sliver(f"site_s{i}") for i in range(10)])
    node.sync()
    node.authority.publish([make_sliver("site_s0")])  # a truncated document
    first = node.sync()
    assert first.valve_tripped and len(first.held) == 9
    assert len(node.names()) == 10  # nothing removed
    assert len(node.store.valve().held) == 9
    node.authority.publish([make_sliver("site_s0")])  # the same removal seen again: confirmed
    second = node.sync()
    assert not second.valve_tripped
    assert node.names() == {"site_s0"}


def test_operator_can_allow_mass_removal(node: Node) -> None:
    node.authority.publish([make_sliver(f"site_s{i}") for i in range(4)])
    node.sync()
    node.authority.publish([])
    node.sync(allow_mass_delete=True)
    assert node.names() == set()


def test_timestamp_rule_keeps_newer_ticket_record(node: Node) -> None:
    node.authority.publish([make_sliver("site_alpha")], timestamp=1_000)
    node.sync()
    newer = replace(make_sliver("site_deleg", instantiation=DELEGATED), source=SOURCE_TICKET, timestamp=5_000)
    node.store.apply_records([newer], [], None)
    stale = make_sliver("site_deleg", instantiation=DELEGATED, attributes=[("nm_cpu_share", "9")])
    node.authority.publish([make_sliver("site_alpha"), stale], timestamp=2_000)
    outcome = node.sync()
    assert "site_deleg" in node.store.slivers()
    assert node.store.sliver("site_deleg").attributes == ()  # the older document did not overwrite
    assert outcome.ok
    # a later document takes over
    node.authority.publish([make_sliver("site_alpha"), stale], timestamp=6_000)
    node.sync()
    assert node.store.sliver("site_deleg").attributes == (("nm_cpu_share", "9"),)


def test_older_document_is_ignored(node: Node) -> None:
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")], timestamp=2_000)
    node.sync()
    node.authority.publish([make_sliver("site_alpha")], timestamp=1_500)
    outcome = node.sync()
    assert outcome.message == "stale document ignored"
    assert node.names() == {"site_alpha", "site_beta"}


def test_expired_sliver_is_destroyed(node: Node) -> None:
    soon = int(node.clock.now()) + 100
    node.authority.publish([make_sliver("site_alpha", expires=soon), make_sliver("site_beta")])
    node.sync()
    assert node.names() == {"site_alpha", "site_beta"}
    node.clock.advance(200)
    node.authority.error = AuthorityUnavailable("down")  # expiry applies even without a document
    node.sync()
    assert node.names() == {"site_beta"}
    assert "site_alpha" not in node.store.slivers()


def test_authority_down_after_restart_destroys_nothing(node: Node) -> None:
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")])
    node.sync()
    node.store.apply_records([], ["site_beta"], None)  # e.g. records lost: an orphan account
    node.restart()
    node.authority.error = AuthorityUnavailable("connection refused")
    outcome = node.sync()
    assert not outcome.ok and "unavailable" in outcome.message
    assert node.names() == {"site_alpha", "site_beta"}  # the orphan waits for a good document
    node.authority.error = None
    node.authority.publish([make_sliver("site_alpha")])
    node.sync()
    assert node.names() == {"site_alpha"}


def test_restart_restarts_nothing(node: Node) -> None:
    node.authority.publish([make_sliver("site_alpha")])
    node.sync()
    node.restart()
    node.backend.calls.clear()
    node.sync()
    assert mutating_calls(node.backend) == {}


def test_drift_repair_recreates_a_vanished_account(node: Node) -> None:
    node.authority.publish([make_sliver("site_alpha")])
    node.sync()
    node.backend.destroy("site_alpha")  # someone removed it behind our back
    outcome = node.sync()
    assert [(a.kind.value, a.reason) for a in outcome.actions][0][0] == "create"
    assert "site_alpha" in node.names()


def test_foreign_account_is_never_touched(node: Node) -> None:
    node.backend.create(make_sliver("site_alpha"))  # exists before the node manager knew it
    foreign_uid = node.backend.observe()["site_alpha"].uid
    node.backend.calls.clear()
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")])
    node.sync()
    state = node.store.account("site_alpha")
    assert state is not None and not state.owned and state.phase is Phase.FAILED
    assert "not created by the node manager" in state.last_error
    assert node.backend.observe()["site_alpha"].uid == foreign_uid
    assert "site_beta" in node.names()
    # removing it from the authority must not destroy the foreign account either
    node.authority.publish([make_sliver("site_beta")])
    node.clock.advance(10_000)
    node.sync()
    assert "site_alpha" in node.names()


def test_failing_sliver_is_retried_with_backoff_and_others_proceed(node: Node) -> None:
    node.backend.fail_create = {"site_bad"}
    node.authority.publish([make_sliver("site_bad"), make_sliver("site_good")])
    node.sync()
    assert node.names() == {"site_good"}
    state = node.store.account("site_bad")
    assert state.phase is Phase.FAILED and state.failures == 1 and state.retry_at > node.clock.now()
    node.backend.fail_create = set()
    outcome = node.sync()  # still inside the backoff window: not retried yet
    assert outcome.actions == []
    node.clock.advance(3600)
    node.sync()
    assert node.names() == {"site_bad", "site_good"}
    assert node.store.account("site_bad").failures == 0


def test_a_failed_destroy_is_finished_and_a_sliver_wanted_again_runs_afresh(node: Node) -> None:
    """A destroy that fails leaves the account half removed (locked, stopped): it stays a
    destroy to finish, never a FAILED sliver that a later document would merely reconfigure --
    that left a sliver wanted again stopped for good."""
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")])
    node.sync()
    assert node.backend.is_running("site_beta")
    node.backend.fail_destroy = {"site_beta"}
    node.authority.publish([make_sliver("site_alpha")])
    node.sync()
    state = node.store.account("site_beta")
    assert state.phase is Phase.DESTROYING and state.failures == 1
    node.backend.fail_destroy = set()
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")])
    node.clock.advance(3600)
    node.sync()
    state = node.store.account("site_beta")
    assert state.phase is Phase.RUNNING and state.failures == 0
    assert node.backend.is_running("site_beta")


def test_a_start_planned_on_a_state_read_before_the_create_finished_runs_once(node: Node) -> None:
    """A cycle that plans while a sliver's create is still in flight sees it unsettled and asks
    for a configure-and-start; queued behind the create (which started it), that start must not
    run the initscript a second time."""
    sliver = make_sliver("site_alpha")
    node.node.operations.ensure(sliver, start=True)   # the create, which starts it
    node.node.operations.ensure(sliver, start=True)   # the stale plan's configure-and-start
    assert node.backend.calls["start"] == 1
    assert node.store.account("site_alpha").phase is Phase.RUNNING


def test_rejected_entry_does_not_delete_existing_sliver(node: Node) -> None:
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")])
    node.sync()
    node.authority.publish([make_sliver("site_alpha")])
    node.authority.protected = frozenset({"site_beta"})  # its new entry was invalid
    node.sync()
    assert node.names() == {"site_alpha", "site_beta"}


# --- starts deferred by a lease --------------------------------------------------------------


def lease_freeze(node: Node, frozen: set[str]) -> None:
    """Make the lease schedule keep ``frozen`` frozen (what ``LeaseScheduler.is_frozen`` and
    ``wanted_frozen`` answer), for the operations and the plan of this process."""
    node.node.operations.lease_frozen = lambda name: name in frozen
    node.node.syncer.frozen = lambda: frozenset(frozen)


def test_a_sliver_created_while_frozen_is_left_stopped_and_started_when_thawed(node: Node) -> None:
    frozen = {"site_alpha", "site_off"}
    lease_freeze(node, frozen)
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_off", attributes=[("nm_enabled", "0")]),
                            make_sliver("site_free")])
    node.sync()
    state = node.store.account("site_alpha")
    assert state.phase is Phase.STOPPED and state.start_pending and not node.backend.is_running("site_alpha")
    assert node.backend.calls["start"] == 1 and node.backend.is_running("site_free")  # not frozen: started
    # a disabled sliver's start is not deferred: it is not started at all (nm_enabled = 0)
    assert not node.store.account("site_off").start_pending
    assert node.store.account("site_free").start_pending is False
    outcome = node.sync()  # still frozen: nothing to do, still not started
    assert outcome.actions == [] and node.backend.calls["start"] == 1
    frozen.clear()  # the lease schedule thaws it
    outcome = node.sync()
    assert [(a.kind.value, a.name, a.reason, a.start) for a in outcome.actions] == [
        ("configure", "site_alpha", "deferred start", True)]
    state = node.store.account("site_alpha")
    assert state.phase is Phase.RUNNING and not state.start_pending and node.backend.is_running("site_alpha")
    assert node.backend.calls["start"] == 2
    assert node.sync().actions == []


def test_a_deferred_start_survives_a_restart_and_runs_after_the_lease(node: Node) -> None:
    """The durable path: the daemon is restarted after the lease ended (the thaw's prompt start
    never ran); the first cycle -- even with the authority down -- starts the sliver."""
    lease_freeze(node, {"site_alpha"})
    node.authority.publish([make_sliver("site_alpha")])
    node.sync()
    assert node.store.account("site_alpha").start_pending
    node.restart()
    lease_freeze(node, set())
    node.authority.error = AuthorityUnavailable("down")
    outcome = node.sync()
    assert [(a.name, a.reason) for a in outcome.actions] == [("site_alpha", "deferred start")]
    assert node.backend.is_running("site_alpha") and not node.store.account("site_alpha").start_pending


def test_start_and_stop_of_a_frozen_sliver(node: Node) -> None:
    """An API Start while frozen is deferred (phase STOPPED, ``start_pending``, no backend start);
    a Stop drops it, so the thaw's queued job does nothing; a Start after the thaw runs."""
    frozen = {"site_alpha"}
    lease_freeze(node, frozen)
    node.authority.publish([make_sliver("site_alpha", instantiation=DELEGATED)])
    node.sync()
    ops = node.node.operations
    ops.ensure(node.store.sliver("site_alpha"), start=False)  # Create(): left stopped
    ops.start("site_alpha")
    state = node.store.account("site_alpha")
    assert state.phase is Phase.STOPPED and state.start_pending and node.backend.calls["start"] == 0
    ops.stop("site_alpha")
    assert not node.store.account("site_alpha").start_pending
    frozen.clear()
    ops.start_deferred("site_alpha")  # the thaw's job, queued before the Stop ran: nothing
    assert node.backend.calls["start"] == 0
    ops.start("site_alpha")
    state = node.store.account("site_alpha")
    assert state.phase is Phase.RUNNING and not state.start_pending and node.backend.calls["start"] == 1


def test_the_thaw_job_starts_only_what_is_pending_and_still_thawed(node: Node) -> None:
    frozen = {"site_alpha", "site_beta"}
    lease_freeze(node, frozen)
    node.authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")])
    node.sync()
    daemon._start_deferred(node.store, node.pool, node.node.operations, ["site_alpha", "site_nope"])
    assert node.pool.wait_idle(5)
    assert node.backend.calls["start"] == 0  # still frozen: left pending
    assert node.store.account("site_alpha").start_pending
    frozen.discard("site_alpha")
    daemon._start_deferred(node.store, node.pool, node.node.operations, ["site_alpha", "site_nope"])
    assert node.pool.wait_idle(5)
    assert node.backend.is_running("site_alpha") and not node.backend.is_running("site_beta")
    assert node.store.account("site_beta").start_pending and node.backend.calls["start"] == 1
    # a destroy forgets the pending start with the rest of the state
    node.node.operations.destroy("site_beta")
    assert node.store.account("site_beta") is None
