"""The node's Prometheus metrics (config ``metrics.listen``), one registry per node.

Why a registry per node and not prometheus_client's global one: the hollow fleet runs many
``NodeManager`` instances in one process, and each must export its own numbers; a global registry
would refuse the second node's metrics as duplicates. Everything here hangs off
:attr:`NodeMetrics.registry`.

Two kinds of numbers:

* **events**, counted as they happen by the methods the daemon calls: :meth:`sync_finished`
  (after every cycle, failed ones included), :meth:`sliver_failed` (a sliver's operation
  failed), :meth:`api_request` (the API server's ``on_request`` hook), :meth:`ticket_rejected`
  and :meth:`enforcement_error`;
* **state**, read from the store and the worker pool at scrape time by a custom collector: slivers
  by instantiation, account states by phase, failures per sliver (only slivers with failures, so
  the series count stays small), the removals held by the safety valve, the worker queue depth.
  Reading at scrape time means the figures are never stale and cost nothing between scrapes.

Label values are bounded so a hostile or buggy caller cannot grow the series without limit:
unknown API method names become ``other``, ticket rejection reasons and enforcer names are mapped
onto fixed sets. Every metric name starts with ``nodemanager_``.

Thread-safety: every method may be called from any thread (prometheus_client's metrics lock
themselves); the HTTP exporter (the project's HTTP server core) runs its event loop on its own
daemon thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .adminkeys import gauge_values as admin_key_gauges
from .bwmon import ByteBudgetCollector
from .conffiles import state_counts as conf_file_counts
from .core.addresses import parse_host_port
from .core.authz import METHODS
from .core.errors import (
    AccountConflict,
    BackendError,
    ConfigError,
    IllegalTransition,
    NodeManagerError,
    NotAllowedForSliver,
    PoolClosed,
    StoreError,
    TicketReason,
)
from .api.fairness import CallerLimits
from .api.identity import TRANSPORT_TCP, PeerIdentity
from .api.peercred import tcp_peer
from .core.records import AccountState, ValveState
from .datadir import Meta
from .http.framing import Request, Response
from .http.server import HttpServer
from .leasing import LeaseCollector

if TYPE_CHECKING:
    from .sync import SyncOutcome

__all__ = [
    "ENFORCERS", "FAILURE_KINDS", "NodeMetrics", "OUTCOMES", "TICKET_REASONS", "StoreView", "parse_listen",
]

logger = logging.getLogger(__name__)

#: Sync outcome labels (``nodemanager_syncs_total{outcome}``): ``sync.SyncResult``'s values.
OUTCOMES = ("ok", "stale", "rejected", "authority-unavailable", "error")
#: Ticket rejection reasons (``core.errors.TicketReason`` labels).
TICKET_REASONS = tuple(reason.label for reason in TicketReason)
#: Enforcer names (enforce/*); anything else is ``other``.
ENFORCERS = ("cpu", "memory", "pids", "bandwidth", "disk", "placement", "other")
#: Labels of ``nodemanager_document_handler_errors`` (``sync.DocumentHandler.name``).
DOCUMENT_HANDLERS = ("admin_keys", "conf_files", "leases", "other")
#: Kinds of failed sliver operations (``nodemanager_sliver_operation_failures_total{kind}``), most
#: specific class first; anything else is ``internal`` (a bug: logged with its traceback).
FAILURE_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (AccountConflict, "conflict"),
    (IllegalTransition, "illegal-transition"),
    (PoolClosed, "shutdown"),
    (NotAllowedForSliver, "not-allowed"),
    (BackendError, "backend"),
    (StoreError, "store"),
    (NodeManagerError, "other"),
)
#: Outcomes of a blocking query (``nodemanager_authority_waits_total{outcome}``, authority.watch).
WAIT_OUTCOMES = ("changed", "not_modified", "error")
#: API method label for names that are not API methods (bounded cardinality).
OTHER_METHOD = "other"

_SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StoreView(Protocol):
    """What the scrape-time collector reads from the store (``Store`` satisfies it)."""

    def counts(self) -> dict[str, int]: ...

    def accounts(self) -> dict[str, AccountState]: ...

    def valve(self) -> ValveState: ...

    def get_meta(self, key: str, default: str = "") -> str: ...


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``metrics.listen`` -> ``(host, port)``; ``""`` -> None (disabled). Raises ConfigError."""
    address = parse_host_port(listen, what="metrics.listen")
    return None if address is None else (address.host, address.port)


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER_METHOD


def failure_kind(error: BaseException) -> str:
    """The ``kind`` label of a failed sliver operation (see :data:`FAILURE_KINDS`)."""
    return next((kind for cls, kind in FAILURE_KINDS if isinstance(error, cls)), "internal")


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
        admin = [GaugeMetricFamily(f"nodemanager_admin_keys{suffix}", text, labels=["account"]) for suffix, text in (
            ("", "Authority keys in each managed account's block"),
            ("_held_removals", "Admin keys whose removal is held (a document would remove every key)"),
            ("_problem", "1 when the last document could not be applied to the account"))]
        for account, values in sorted(admin_key_gauges(_safe_meta(store, Meta.ADMIN_KEYS)).items()):
            for family, value in zip(admin, values):
                family.add_metric([account], float(value))
        yield from admin
        conf_files = GaugeMetricFamily("nodemanager_conf_files", "Configuration files by the state of the last "
                                       "document (installed, unchanged, refused, failed, disabled)", labels=["state"])
        for state, count in (conf_file_counts(_safe_meta(store, Meta.CONF_FILES)) or {}).items():
            conf_files.add_metric([state], float(count))
        yield conf_files


#: Open scrape connections at once; one more is answered 503 (scrapers are few).
MAX_SCRAPE_CONNECTIONS = 64
#: Open scrape connections of one uid at once (root exempt): a sliver must not take them all.
MAX_SCRAPE_CONNECTIONS_PER_UID = 4
#: Seconds a scraper has to send its request (and may stay idle between scrapes).
SCRAPE_READ_TIMEOUT = 10.0


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
        self._server: HttpServer | None = None
        self._address: tuple[str, int] | None = None
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
        self.sliver_failures = Counter(
            "nodemanager_sliver_operation_failures",
            "Failed sliver operations by kind (each is retried with backoff)", ["kind"], registry=r,
        )
        for label in {kind for _, kind in FAILURE_KINDS} | {"internal"}:
            self.sliver_failures.labels(label)
        self.handler_errors = Counter(
            "nodemanager_document_handler_errors",
            "Node-wide document handlers (admin keys, configuration files) that failed", ["handler"],
            registry=r,
        )
        for label in DOCUMENT_HANDLERS:
            self.handler_errors.labels(label)
        self.authority_blocking = Gauge(
            "nodemanager_authority_blocking",
            "1 while the node watches the authority with blocking queries, 0 while it only polls", registry=r,
        )
        self.authority_waits = Counter(
            "nodemanager_authority_waits", "Blocking queries to the authority by outcome", ["outcome"], registry=r,
        )
        for label in WAIT_OUTCOMES:
            self.authority_waits.labels(label)
        r.register(_StateCollector(store, queue_depth))
        if store is not None:
            r.register(LeaseCollector(store, now))
        self.byte_budget_events = Counter(
            "nodemanager_byte_budget_events", "Daily byte budget caps set (capped) and lifted (lifted)",
            ["event"], registry=r,
        )
        for label in ("capped", "lifted"):
            self.byte_budget_events.labels(label)
        if store is not None and hasattr(store, "byte_budgets"):
            r.register(ByteBudgetCollector(store.byte_budgets))

    def restore(self, store: StoreView) -> None:
        """Take what survives a restart from the store (the last good sync's time): called once
        the store is open, not at construction (building the node opens nothing)."""
        raw = _safe_meta(store, Meta.LAST_GOOD)
        if raw.isdigit():
            self.last_success.set(float(raw))

    # --- events ---------------------------------------------------------------------------
    def sync_finished(self, outcome: SyncOutcome) -> None:
        """Count one finished cycle: duration, outcome, last success, valve trip, rejections."""
        self.sync_duration.observe(max(0.0, outcome.duration_s))
        self.syncs.labels(outcome.result.value).inc()
        if outcome.ok:
            self.last_success.set(self._now())
        if outcome.valve_tripped:
            self.valve_trips.inc()
        if outcome.rejected:
            self.rejected_entries.inc(outcome.rejected)

    def authority_mode(self, watching: bool) -> None:
        """The watcher started (True) or stopped (False) using blocking queries."""
        self.authority_blocking.set(1 if watching else 0)

    def authority_wait(self, outcome: str) -> None:
        """One finished blocking query; ``outcome`` is one of :data:`WAIT_OUTCOMES`."""
        self.authority_waits.labels(outcome if outcome in WAIT_OUTCOMES else "error").inc()

    def handler_failed(self, name: str) -> None:
        """The sync's ``on_handler_error`` hook: one document handler failed unexpectedly."""
        self.handler_errors.labels(name if name in DOCUMENT_HANDLERS else "other").inc()

    def sliver_failed(self, name: str, error: BaseException) -> None:
        """One failed operation of sliver ``name`` (its failures gauge comes from the store)."""
        self.sliver_failures.labels(failure_kind(error)).inc()

    def api_request(self, method: str, fault_code: int | None, seconds: float) -> None:
        """The API server's ``on_request`` hook: one finished call."""
        label = method_label(method)
        self.api_requests.labels(label, "ok" if fault_code is None else str(int(fault_code))).inc()
        self.api_latency.labels(label).observe(max(0.0, seconds))

    def ticket_rejected(self, reason: TicketReason) -> None:
        """One rejected ticket, by reason."""
        self.ticket_rejections.labels(reason.label).inc()

    def byte_budget_event(self, kind: str) -> None:
        """A sliver's byte budget cap was set (``capped``) or lifted (``lifted``)."""
        self.byte_budget_events.labels(kind if kind in ("capped", "lifted") else "lifted").inc()

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
        return self._address if self._server is not None else None

    def start_http(self, listen: str) -> tuple[str, int] | None:
        """Serve the text format on ``listen`` ("HOST:PORT"; "" disables) from a daemon thread.

        The project's HTTP server core (:mod:`nodemanager.http.server`) answers GET and HEAD on
        any path with the exposition; the collection runs in a worker thread so a slow store
        read never stalls the loop. Returns the bound address, or None when disabled. Raises
        ConfigError for a malformed address and ``NodeManagerError`` when the port cannot be
        bound."""
        address = parse_listen(listen)
        if address is None:
            return None
        if self._server is not None:
            raise RuntimeError("metrics exporter already started")
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=MAX_SCRAPE_CONNECTIONS)
        except OSError as exc:
            raise NodeManagerError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        bound = sock.getsockname()[:2]
        limits = CallerLimits(max_connections=MAX_SCRAPE_CONNECTIONS_PER_UID)
        server = HttpServer(self._scrape, methods=("GET", "HEAD"), max_request_bytes=0,
                            read_timeout=SCRAPE_READ_TIMEOUT, max_connections=MAX_SCRAPE_CONNECTIONS,
                            identify=_scraper,
                            admit=lambda peer: None if limits.admit(peer.uid) else "too many connections from this uid",
                            release=lambda peer: limits.release(peer.uid), name="metrics")
        server.add_listener(sock, "metrics")
        try:
            server.start()
        except Exception as exc:
            sock.close()
            raise NodeManagerError(f"cannot serve metrics on {listen}: {exc}") from exc
        self._server, self._address = server, (str(bound[0]), int(bound[1]))
        logger.info("event=metrics-listening address=%s", self._address)
        return self._address

    async def _scrape(self, request: Request, body: bytes, peer: object) -> Response:
        payload = await asyncio.to_thread(self.render)
        return Response(200, payload, CONTENT_TYPE_LATEST.encode("ascii"))

    def stop(self) -> None:
        """Stop the exporter (idempotent; nothing to do when it was never started)."""
        server = self._server
        self._server = None
        if server is not None:
            server.stop(grace=1.0)


def _scraper(sock: socket.socket, label: str) -> PeerIdentity:
    """Who owns a scraper's socket, for its per-uid cap (:data:`MAX_SCRAPE_CONNECTIONS_PER_UID`).

    Asked of the kernel as the API does (:func:`.api.peercred.tcp_peer`), but for any local
    address, not only loopback: a sliver shares the node's network and may connect to its public
    address. A remote scraper has no socket here, so no uid: remote scrapers share one cap, as
    do peers whose lookup failed (never a guessed uid, never root's)."""
    try:
        return tcp_peer(sock.getsockname(), sock.getpeername(), loopback_only_identity=False, connection=sock)
    except (OSError, ValueError, TypeError, IndexError):
        return PeerIdentity(TRANSPORT_TCP, None)


def _safe_meta(store: StoreView, key: str) -> str:
    try:
        return store.get_meta(key, "")
    except NodeManagerError:
        return ""
