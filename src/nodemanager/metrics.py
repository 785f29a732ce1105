"""The node's Prometheus metrics (config ``metrics.listen``), one registry per node.

Why a registry per node and not prometheus_client's global one: the hollow fleet runs many
``NodeManager`` instances in one process, and each must export its own numbers; a global registry
would refuse the second node's metrics as duplicates. Everything here hangs off
:attr:`NodeMetrics.registry`.

Two kinds of numbers:

* **events**, counted as they happen by the methods the daemon calls: :meth:`sync_finished`
  (after every cycle), :meth:`sync_failed` (a cycle that raised), :meth:`api_request` (the API
  server's ``on_request`` hook), :meth:`ticket_rejected` and :meth:`enforcement_error`;
* **state**, read from the store and the worker pool at scrape time by a custom collector: slivers
  by instantiation, account states by phase, failures per sliver (only slivers with failures, so
  the series count stays small), the removals held by the safety valve, the worker queue depth.
  Reading at scrape time means the figures are never stale and cost nothing between scrapes.

Label values are bounded so a hostile or buggy caller cannot grow the series without limit:
unknown API method names become ``other``, ticket rejection reasons and enforcer names are mapped
onto fixed sets. Every metric name starts with ``nodemanager_``.

Thread-safety: every method may be called from any thread (prometheus_client's metrics lock
themselves); the HTTP exporter runs on its own daemon thread.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from . import __version__
from .core.authz import METHODS
from .core.errors import ConfigError, NodeManagerError
from .core.records import AccountState, ValveState

if TYPE_CHECKING:
    from .sync import SyncOutcome

__all__ = [
    "ENFORCERS", "NodeMetrics", "OUTCOMES", "TICKET_REASONS", "StoreView", "parse_listen",
]

logger = logging.getLogger(__name__)

#: Sync outcome labels (``nodemanager_syncs_total{outcome}``).
OUTCOMES = ("ok", "authority-unavailable", "rejected", "stale", "store-error")
#: Ticket rejection reasons (tickets.md / api.md fault 102); anything else is ``other``.
TICKET_REASONS = ("signature", "expired", "wrong-node", "replay", "malformed", "permission", "other")
#: Enforcer names (enforce/*); anything else is ``other``.
ENFORCERS = ("cpu", "memory", "bandwidth", "disk", "other")
#: API method label for names that are not API methods (bounded cardinality).
OTHER_METHOD = "other"

_SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REASON_ALIASES = {
    "bad-signature": "signature", "invalid-signature": "signature", "signature-invalid": "signature",
    "wrong-node": "wrong-node", "node": "wrong-node", "not-this-node": "wrong-node",
    "replayed": "replay", "replay": "replay", "expiry": "expired", "expired": "expired",
    "denied": "permission", "permission-denied": "permission", "not-allowed": "permission",
    # the "<reason>: details" prefixes of the node's TicketRejected messages
    "not-yet-valid": "expired", "stale": "replay",
    "wrong-caller": "permission", "wrong-instantiation": "malformed", "too-large": "malformed",
    "invalid-slice-name": "malformed", "invalid-controller-name": "malformed",
}


class StoreView(Protocol):
    """What the scrape-time collector reads from the store (``Store`` satisfies it)."""

    def counts(self) -> dict[str, int]: ...

    def accounts(self) -> dict[str, AccountState]: ...

    def valve(self) -> ValveState: ...

    def get_meta(self, key: str, default: str = "") -> str: ...


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``"HOST:PORT"`` / ``"[V6]:PORT"`` -> ``(host, port)``; ``""`` -> None (disabled).
    Raises ConfigError naming ``metrics.listen``."""
    if not listen:
        return None
    host, colon, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"metrics.listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9812")
    return host, int(port)


def outcome_label(outcome: SyncOutcome) -> str:
    """The ``outcome`` label of one cycle (see :data:`OUTCOMES`)."""
    if outcome.ok:
        return "stale" if outcome.result == "stale" else "ok"
    return "rejected" if outcome.result == "rejected" else "authority-unavailable"


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER_METHOD


def reason_label(reason: str) -> str:
    key = reason.strip().lower().replace("_", "-").replace(" ", "-")
    key = _REASON_ALIASES.get(key, key)
    return key if key in TICKET_REASONS else "other"


def enforcer_label(enforcer: str) -> str:
    key = enforcer.strip().lower()
    return key if key in ENFORCERS else "other"


class _StateCollector(Collector):
    """Reads the store and the pool at scrape time (see the module docstring)."""

    def __init__(self, store: StoreView | None, queue_depth: Callable[[], int] | None) -> None:
        self._store = store
        self._queue_depth = queue_depth

    def describe(self) -> list[Metric]:
        """Nothing to pre-declare: registering must not read the store (it may be slow)."""
        return []

    def collect(self) -> Iterator[Metric]:
        if self._queue_depth is not None:
            depth = GaugeMetricFamily(
                "nodemanager_worker_queue_depth", "Slivers with an operation running or pending"
            )
            depth.add_metric([], float(self._queue_depth()))
            yield depth
        store = self._store
        if store is None:
            return
        up = GaugeMetricFamily("nodemanager_store_readable", "1 if the store answered this scrape")
        try:
            counts = store.counts()
            accounts = store.accounts()
            valve = store.valve()
        except NodeManagerError as exc:
            logger.warning("event=metrics-store-unreadable error=%s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        slivers = GaugeMetricFamily(
            "nodemanager_slivers", "Sliver records by instantiation", labels=["instantiation"]
        )
        states = GaugeMetricFamily("nodemanager_accounts", "Sliver account states by phase", labels=["state"])
        for key, value in sorted(counts.items()):
            kind, _, label = key.partition(".")
            if kind == "records" and label:
                slivers.add_metric([label], float(value))
            elif kind == "accounts" and label:
                states.add_metric([label], float(value))
        yield slivers
        yield states
        failures = GaugeMetricFamily(
            "nodemanager_sliver_failures",
            "Consecutive failed operations of each sliver that has any (absent: none)",
            labels=["sliver"],
        )
        for name in sorted(accounts):
            if accounts[name].failures > 0:
                failures.add_metric([name], float(accounts[name].failures))
        yield failures
        held = GaugeMetricFamily(
            "nodemanager_safety_valve_held_removals", "Removals currently held by the safety valve"
        )
        held.add_metric([], float(len(valve.held)))
        yield held


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes every few seconds would drown the daemon's log."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One daemon thread per scrape: a slow scraper never blocks another or the shutdown."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        logger.debug("event=metrics-scrape-error peer=%s", client_address, exc_info=True)


class _V6WSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class NodeMetrics:
    """The metric set of one node and, optionally, its HTTP exporter.

    ``store`` and ``queue_depth`` feed the scrape-time collector (either may be None, e.g. in
    unit tests); ``backend`` labels ``nodemanager_build_info``; ``now`` is the wall clock used for
    the last-success gauge (injectable for tests)."""

    def __init__(
        self,
        *,
        store: StoreView | None = None,
        queue_depth: Callable[[], int] | None = None,
        backend: str = "",
        now: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._now = now
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        r = self.registry
        info = Gauge("nodemanager_build_info", "Version and backend of this node manager",
                     ["version", "backend"], registry=r)
        info.labels(__version__, backend or "unknown").set(1)
        self.sync_duration = Histogram(
            "nodemanager_sync_duration_seconds", "Duration of sync cycles", buckets=_SYNC_BUCKETS, registry=r
        )
        self.syncs = Counter("nodemanager_syncs", "Sync cycles by outcome", ["outcome"], registry=r)
        for label in OUTCOMES:
            self.syncs.labels(label)
        self.last_success = Gauge(
            "nodemanager_last_successful_sync_timestamp_seconds",
            "Unix time of the last sync cycle that ended well (0: none since the store was made)",
            registry=r,
        )
        self.valve_trips = Counter(
            "nodemanager_safety_valve_trips", "Documents whose removals the safety valve held", registry=r
        )
        self.rejected_entries = Counter(
            "nodemanager_authority_entries_rejected",
            "Sliver entries of authority documents dropped by validation", registry=r,
        )
        self.api_requests = Counter(
            "nodemanager_api_requests", "API calls by method and fault code (ok: no fault)",
            ["method", "code"], registry=r,
        )
        self.api_latency = Histogram(
            "nodemanager_api_request_duration_seconds", "API call latency by method",
            ["method"], buckets=_API_BUCKETS, registry=r,
        )
        self.ticket_rejections = Counter(
            "nodemanager_ticket_rejections", "Tickets rejected, by reason", ["reason"], registry=r
        )
        for label in TICKET_REASONS:
            self.ticket_rejections.labels(label)
        self.enforcement_errors = Counter(
            "nodemanager_enforcement_errors", "Failed enforcement operations, by enforcer",
            ["enforcer"], registry=r,
        )
        for label in ENFORCERS:
            self.enforcement_errors.labels(label)
        if store is not None:
            raw = _safe_meta(store, "last_good_sync_time")
            if raw.isdigit():
                self.last_success.set(float(raw))
        r.register(_StateCollector(store, queue_depth))

    # --- events ---------------------------------------------------------------------------
    def sync_finished(self, outcome: SyncOutcome) -> None:
        """Count one finished cycle: duration, outcome, last success, valve trip, rejections."""
        self.sync_duration.observe(max(0.0, outcome.duration_s))
        self.syncs.labels(outcome_label(outcome)).inc()
        if outcome.ok:
            self.last_success.set(self._now())
        if outcome.valve_tripped:
            self.valve_trips.inc()
        if outcome.rejected:
            self.rejected_entries.inc(outcome.rejected)

    def sync_failed(self, outcome: str = "store-error") -> None:
        """Count a cycle that raised instead of returning an outcome (e.g. the store is full)."""
        self.syncs.labels(outcome if outcome in OUTCOMES else "store-error").inc()

    def api_request(self, method: str, fault_code: int | None, seconds: float) -> None:
        """The API server's ``on_request`` hook: one finished call."""
        label = method_label(method)
        self.api_requests.labels(label, "ok" if fault_code is None else str(int(fault_code))).inc()
        self.api_latency.labels(label).observe(max(0.0, seconds))

    def ticket_rejected(self, reason_class: str) -> None:
        """One rejected ticket; ``reason_class`` is mapped onto :data:`TICKET_REASONS`."""
        self.ticket_rejections.labels(reason_label(reason_class)).inc()

    def enforcement_error(self, enforcer: str) -> None:
        """One failed enforcement operation; ``enforcer`` is mapped onto :data:`ENFORCERS`."""
        self.enforcement_errors.labels(enforcer_label(enforcer)).inc()

    # --- exposition -------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of this node's registry."""
        return generate_latest(self.registry)

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` actually bound while serving (the real port when 0 was asked)."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start_http(self, listen: str) -> tuple[str, int] | None:
        """Serve the text format on ``listen`` ("HOST:PORT"; "" disables) from a daemon thread.

        Returns the bound address, or None when disabled. Raises ConfigError for a malformed
        address and OperationFailed-like ``NodeManagerError`` when the port cannot be bound."""
        address = parse_listen(listen)
        if address is None:
            return None
        if self._server is not None:
            raise RuntimeError("metrics exporter already started")
        host, port = address
        server_class = _V6WSGIServer if ":" in host else _ThreadingWSGIServer
        try:
            server = make_server(host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise NodeManagerError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="nm-metrics", daemon=True)
        self._thread.start()
        bound = self.address
        logger.info("event=metrics-listening address=%s", bound)
        return bound

    def stop(self) -> None:
        """Stop the exporter (idempotent; nothing to do when it was never started)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(5.0)


def _safe_meta(store: StoreView, key: str) -> str:
    try:
        return store.get_meta(key, "")
    except NodeManagerError:
        return ""
