"""NodeMetrics: the metric set, bounded labels, scrape-time state, the exporter, daemon wiring."""

from __future__ import annotations

import threading
import urllib.request
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodemanager.api.client import local_proxy
from nodemanager.config import Config, parse_config
from nodemanager.core.authz import ANONYMOUS
from nodemanager.core.errors import (
    AccountConflict,
    AuthorityUnavailable,
    BackendError,
    ConfigError,
    DocumentRejected,
    IllegalTransition,
    StoreError,
    TicketReason,
    TicketRejected,
)
from nodemanager.core.records import AccountState, Phase, ValveState
from nodemanager.daemon import CountedRedeemer, Node, build_node
from nodemanager.metrics import NodeMetrics, parse_listen
from nodemanager.store import Store
from nodemanager.sync import SyncOutcome, SyncResult
from nodemanager.testing.fakeauthority import FakeAuthority, make_sliver


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition into {(sample name, sorted labels): value}."""
    if isinstance(text, bytes):
        text = text.decode()
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def value(metrics: NodeMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics.render()).get((name, tuple(sorted(labels.items()))))


def test_sync_outcomes_duration_last_success_valve_and_rejections() -> None:
    clock = [1_700_000_000.0]
    metrics = NodeMetrics(now=lambda: clock[0])
    assert value(metrics, "nodemanager_last_successful_sync_timestamp_seconds") == 0.0
    metrics.sync_finished(SyncOutcome(ok=True, message="ok", duration_s=0.2, rejected=3, valve_tripped=True))
    clock[0] += 60
    metrics.sync_finished(SyncOutcome(ok=True, message="stale document ignored", result=SyncResult.STALE))
    metrics.sync_finished(SyncOutcome(ok=False, message="authority unavailable: x", result=SyncResult.UNAVAILABLE))
    metrics.sync_finished(SyncOutcome(ok=False, message="authority rejected: x", result=SyncResult.REJECTED))
    metrics.sync_finished(SyncOutcome(ok=False, message="sync failed: StoreError", result=SyncResult.ERROR))
    assert value(metrics, "nodemanager_syncs_total", outcome="ok") == 1
    assert value(metrics, "nodemanager_syncs_total", outcome="stale") == 1
    assert value(metrics, "nodemanager_syncs_total", outcome="authority-unavailable") == 1
    assert value(metrics, "nodemanager_syncs_total", outcome="rejected") == 1
    assert value(metrics, "nodemanager_syncs_total", outcome="error") == 1
    assert value(metrics, "nodemanager_sync_duration_seconds_count") == 5
    assert value(metrics, "nodemanager_sync_duration_seconds_bucket", le="0.25") == 5
    # the last success is the stale cycle's (it ended well), not the failures'
    assert value(metrics, "nodemanager_last_successful_sync_timestamp_seconds") == clock[0]
    assert value(metrics, "nodemanager_safety_valve_trips_total") == 1
    assert value(metrics, "nodemanager_authority_entries_rejected_total") == 3


def test_api_requests_by_method_and_code_with_bounded_method_names() -> None:
    metrics = NodeMetrics()
    metrics.api_request("GetXIDs", None, 0.002)
    metrics.api_request("GetXIDs", None, 0.004)
    metrics.api_request("GetRSpec", 102, 0.001)
    for i in range(50):  # a scanner trying names must not grow the series
        metrics.api_request(f"Evil{i}", 100, 0.0001)
    metrics.api_request("?", 102, 0.0001)
    assert value(metrics, "nodemanager_api_requests_total", method="GetXIDs", code="ok") == 2
    assert value(metrics, "nodemanager_api_requests_total", method="GetRSpec", code="102") == 1
    assert value(metrics, "nodemanager_api_requests_total", method="other", code="100") == 50
    assert value(metrics, "nodemanager_api_requests_total", method="other", code="102") == 1
    assert value(metrics, "nodemanager_api_request_duration_seconds_count", method="GetXIDs") == 2
    assert value(metrics, "nodemanager_api_request_duration_seconds_bucket", method="GetXIDs", le="0.005") == 2
    methods = {dict(labels).get("method") for (name, labels) in samples(metrics.render())
               if name == "nodemanager_api_requests_total"}
    assert methods == {"GetXIDs", "GetRSpec", "other"}


def test_ticket_and_enforcement_labels_are_bounded() -> None:
    metrics = NodeMetrics()
    metrics.ticket_rejected(TicketReason.SIGNATURE)
    metrics.ticket_rejected(TicketReason.EXPIRED)
    metrics.ticket_rejected(TicketReason.WRONG_NODE)
    metrics.enforcement_error("bandwidth")
    metrics.enforcement_error("CPU")
    metrics.enforcement_error("a new enforcer")
    assert value(metrics, "nodemanager_ticket_rejections_total", reason="bad-signature") == 1
    assert value(metrics, "nodemanager_ticket_rejections_total", reason="expired") == 1
    assert value(metrics, "nodemanager_ticket_rejections_total", reason="wrong-node") == 1
    assert value(metrics, "nodemanager_ticket_rejections_total", reason="replay") == 0
    reasons = {dict(labels)["reason"] for (name, labels) in samples(metrics.render())
               if name == "nodemanager_ticket_rejections_total"}
    assert reasons == {reason.label for reason in TicketReason}
    assert value(metrics, "nodemanager_enforcement_errors_total", enforcer="bandwidth") == 1
    assert value(metrics, "nodemanager_enforcement_errors_total", enforcer="cpu") == 1
    assert value(metrics, "nodemanager_enforcement_errors_total", enforcer="other") == 1


def test_each_node_has_its_own_registry() -> None:
    first, second = NodeMetrics(backend="hollow"), NodeMetrics(backend="hollow")
    first.api_request("Help", None, 0.001)
    assert value(first, "nodemanager_api_requests_total", method="Help", code="ok") == 1
    assert value(second, "nodemanager_api_requests_total", method="Help", code="ok") is None
    assert value(first, "nodemanager_build_info", version=__import__("nodemanager").__version__,
                 backend="hollow") == 1


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "nm.sqlite") as opened:
        yield opened


def test_state_is_read_from_the_store_and_pool_at_scrape_time(store: Store) -> None:
    depth = [0]
    metrics = NodeMetrics(store=store, queue_depth=lambda: depth[0])
    before = samples(metrics.render())
    assert before[("nodemanager_slivers", (("instantiation", "plc-instantiated"),))] == 0
    assert not any(name == "nodemanager_sliver_failures" for name, _ in before)

    store.apply_records([make_sliver("site_a"), make_sliver("site_b", instantiation="delegated")], [], {})
    store.put_account(AccountState(name="site_a", uid=1001, owned=True, phase=Phase.RUNNING))
    store.record_failure("site_b", "boom", 0.0)
    store.record_failure("site_b", "boom again", 0.0)
    store.set_valve(ValveState(held=frozenset({"site_x", "site_y"}), seen=1))
    depth[0] = 7

    after = samples(metrics.render())
    assert after[("nodemanager_slivers", (("instantiation", "plc-instantiated"),))] == 1
    assert after[("nodemanager_slivers", (("instantiation", "delegated"),))] == 1
    assert after[("nodemanager_accounts", (("state", "running"),))] == 1
    assert after[("nodemanager_accounts", (("state", "failed"),))] == 1
    assert after[("nodemanager_sliver_failures", (("sliver", "site_b"),))] == 2
    assert ("nodemanager_sliver_failures", (("sliver", "site_a"),)) not in after
    assert after[("nodemanager_safety_valve_held_removals", ())] == 2
    assert after[("nodemanager_worker_queue_depth", ())] == 7
    assert after[("nodemanager_store_readable", ())] == 1


def test_an_unreadable_store_does_not_break_the_scrape() -> None:
    class BrokenStore:
        def counts(self) -> dict[str, int]:
            raise StoreError("disk on fire")

        def accounts(self) -> dict[str, AccountState]:
            raise StoreError("disk on fire")

        def valve(self) -> ValveState:
            raise StoreError("disk on fire")

        def get_meta(self, key: str, default: str = "") -> str:
            raise StoreError("disk on fire")

    metrics = NodeMetrics(store=BrokenStore(), queue_depth=lambda: 3)
    scraped = samples(metrics.render())
    assert scraped[("nodemanager_store_readable", ())] == 0
    assert scraped[("nodemanager_worker_queue_depth", ())] == 3


def test_last_success_survives_a_restart_through_the_store(store: Store) -> None:
    store.set_meta({"last_good_sync_time": "1700000123"})
    metrics = NodeMetrics(store=store)
    metrics.restore(store)
    assert value(metrics, "nodemanager_last_successful_sync_timestamp_seconds") == 1700000123


def test_sliver_failures_are_counted_by_kind() -> None:
    metrics = NodeMetrics()
    metrics.sliver_failed("site_a", AccountConflict("x"))
    metrics.sliver_failed("site_a", IllegalTransition("absent -> destroying"))
    metrics.sliver_failed("site_b", KeyError("a bug"))
    metrics.sliver_failed("site_b", BackendError("useradd failed"))
    for kind in ("conflict", "illegal-transition", "internal", "backend"):
        assert value(metrics, "nodemanager_sliver_operation_failures_total", kind=kind) == 1, kind
    assert value(metrics, "nodemanager_sliver_operation_failures_total", kind="store") == 0


def test_http_exporter_serves_and_stops() -> None:
    metrics = NodeMetrics()
    assert metrics.start_http("") is None
    host, port = metrics.start_http("127.0.0.1:0")  # type: ignore[misc]
    try:
        metrics.api_request("Help", None, 0.001)
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            body = response.read()
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
        assert samples(body)[("nodemanager_api_requests_total", (("code", "ok"), ("method", "Help")))] == 1
    finally:
        metrics.stop()
    metrics.stop()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2)


@pytest.mark.parametrize("bad", ["9812", "host:", ":80", "127.0.0.1:99999", "127.0.0.1:x"])
def test_listen_address_errors_name_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match="metrics.listen"):
        parse_listen(bad)


def test_listen_accepts_ipv6_brackets() -> None:
    assert parse_listen("[::1]:9812") == ("::1", 9812)


def daemon_config(tmp_path: Path, listen: str) -> Config:
    return parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"poll_interval": 3600, "poll_jitter": 0},
        "api": {"tcp": "", "unix_socket": str(tmp_path / "api.sock")},
        "metrics": {"listen": listen},
        "slivers": {"backend": "hollow"},
    })


def test_daemon_wiring_sync_api_and_exporter(tmp_path: Path) -> None:
    authority = FakeAuthority()
    authority.publish([make_sliver("site_alpha"), make_sliver("site_beta")])
    manager = build_node(daemon_config(tmp_path, "127.0.0.1:0"), fetch=authority.fetch)
    synced = threading.Event()
    manager.on_sync.append(lambda outcome: synced.set())
    loop = threading.Thread(target=manager.run, daemon=True)
    loop.start()
    try:
        assert synced.wait(10)
        assert manager.pool.wait_idle(10)
        with local_proxy(tmp_path / "api.sock", timeout=10) as proxy:
            assert set(proxy.GetXIDs()) == {"site_alpha", "site_beta"}
            with pytest.raises(xmlrpc.client.Fault):
                proxy.NoSuchMethod()
        # the authority goes down, then returns garbage: both are counted by class
        synced.clear()
        authority.error = AuthorityUnavailable("connection refused")
        manager.poll_now()
        assert synced.wait(10)
        synced.clear()
        authority.error = DocumentRejected("truncated")
        manager.poll_now()
        assert synced.wait(10)
        address = manager.metrics.address
        assert address is not None
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=5) as response:
            scraped = samples(response.read())
    finally:
        manager.stop()
        loop.join(20)
    assert not loop.is_alive()
    assert scraped[("nodemanager_syncs_total", (("outcome", "ok"),))] == 1
    assert scraped[("nodemanager_syncs_total", (("outcome", "authority-unavailable"),))] == 1
    assert scraped[("nodemanager_syncs_total", (("outcome", "rejected"),))] == 1
    assert scraped[("nodemanager_api_requests_total", (("code", "ok"), ("method", "GetXIDs")))] == 1
    assert scraped[("nodemanager_api_requests_total", (("code", "100"), ("method", "other")))] == 1
    assert scraped[("nodemanager_slivers", (("instantiation", "plc-instantiated"),))] == 2
    assert scraped[("nodemanager_last_successful_sync_timestamp_seconds", ())] > 0
    assert manager.metrics.address is None  # close() stopped the exporter


def test_a_busy_metrics_port_does_not_stop_the_daemon(tmp_path: Path) -> None:
    blocker = NodeMetrics()
    host, port = blocker.start_http("127.0.0.1:0")  # type: ignore[misc]
    try:
        authority = FakeAuthority()
        manager = build_node(daemon_config(tmp_path, f"{host}:{port}"), fetch=authority.fetch)
        synced = threading.Event()
        manager.on_sync.append(lambda outcome: synced.set())
        loop = threading.Thread(target=manager.run, daemon=True)
        loop.start()
        try:
            assert synced.wait(10)
            assert manager.metrics.address is None
            with local_proxy(tmp_path / "api.sock", timeout=10) as proxy:
                assert proxy.Help()
        finally:
            manager.stop()
            loop.join(20)
        assert not loop.is_alive()
    finally:
        blocker.stop()


class _RejectingRedeemer:
    """A ticket port that rejects every ticket for the reason it is given."""

    def __init__(self, reason: TicketReason) -> None:
        self.reason = reason

    def redeem(self, ticket: str, caller: object) -> str:
        raise TicketRejected(self.reason, "details")


@pytest.mark.parametrize("reason", list(TicketReason))
def test_ticket_rejections_are_counted_by_reason(reason: TicketReason) -> None:
    metrics = NodeMetrics()
    redeemer = CountedRedeemer(_RejectingRedeemer(reason), metrics)
    with pytest.raises(TicketRejected, match=f"^{reason.value}: details$"):
        redeemer.redeem("<ticket/>", ANONYMOUS)
    assert value(metrics, "nodemanager_ticket_rejections_total", reason=reason.label) == 1.0


def test_http_exporter_answers_head_and_refuses_other_methods() -> None:
    from nodemanager.http.client import request

    metrics = NodeMetrics()
    host, port = metrics.start_http("127.0.0.1:0")  # type: ignore[misc]
    try:
        head = request(f"http://{host}:{port}/metrics", method="HEAD", timeout=5, max_body=1 << 20)
        assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0
        post = request(f"http://{host}:{port}/metrics", method="POST", body=b"x", timeout=5, max_body=1 << 20)
        assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
    finally:
        metrics.stop()
