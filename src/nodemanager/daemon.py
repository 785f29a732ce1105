"""Composition root: :func:`build_node` builds the whole node; :meth:`Node.start` brings it up.

This is the only module that names concrete adapter classes and wires them together. Building
does nothing to the machine: no lock is taken, no file opened, no thread started, no socket
bound (uvicorn's ``Config`` -> ``Server``, kubelet's ``NewMainKubelet`` -> ``Run``). Every
collaborator that a test, a benchmark or the crash simulation wants to replace is a parameter
(host, backend, authority fetch, clock, ticket verifier, enforcement), and nothing is assigned to
a built object afterwards. :meth:`Node.start` then takes the data directory's lock, opens the
store, checks what enforcement and sshd can do here and starts the threads; :meth:`Node.run`
polls until stopped; :meth:`Node.close` undoes ``start``.

The CLI, the demo, the tests and the benchmarks all build the node here.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .api.methods import NodeManagerApi, TicketRedeemer, caller_resolver
from .api.server import ApiServer
from .authority.blocking import offers_blocking
from .authority.client import AuthorityClient, next_poll_delay
from .authority.watch import AuthorityWatcher
from .bwmon import ByteBudgetMonitor
from .backends.base import Backend
from .clock import Clock, SystemClock
from .config import Config
from .core.authz import Caller
from .core.errors import NodeManagerError, TicketRejected
from .core.plan import Action
from .core.retry import backoff_delay
from .datadir import AlreadyRunning, DataDir, Meta
from .documenthandlers import document_handlers_from_config
from .enforce.set import EnforcementSet
from .enforcing import EnforcementHooks, EnforcementLoop
from .health import sd_notify
from .host import Host
from .leasing import AccountLoginLock, CgroupFreezer, LeaseHandler, LeaseScheduler
from .metrics import NodeMetrics
from .operations import SliverOperations
from .store import Store
from .sync import Fetch, SyncOutcome, Syncer
from .tickets import ticket_redeemer_from_config
from .workers import WorkerPool

__all__ = ["AlreadyRunning", "Node", "build_node"]

logger = logging.getLogger(__name__)

#: After a failed poll, retry sooner than the poll period: 30 s, 60 s, ... up to the period.
FAILED_POLL_RETRY_S = 30.0
#: Longest the main thread sleeps without checking for signals (see ``Node._sleep``).
SIGNAL_CHECK_S = 0.5


class _Default:
    """Marks a collaborator left to the configuration (``None`` means "none at all")."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: "Build this collaborator from the configuration".
DEFAULT: Final = _Default()


class CountedRedeemer:
    """A ticket redeemer whose rejections are counted by reason."""

    def __init__(self, inner: TicketRedeemer, metrics: NodeMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def redeem(self, ticket: str, caller: Caller) -> str:
        try:
            return self.inner.redeem(ticket, caller)
        except TicketRejected as exc:
            self.metrics.ticket_rejected(exc.reason)
            raise


class NodeCap:
    """The node's bandwidth cap (kbit/s, None for none) from the newest authority document.

    Read from the store once per cycle (:meth:`refresh`), not once per operation: callers get it
    by calling the object. Thread-safe (one reference assignment)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._kbps: int | None = None

    def __call__(self) -> int | None:
        return self._kbps

    def refresh(self) -> bool:
        """Re-read the cap; True when it changed."""
        raw = self._store.get_meta(Meta.BWCAP, "")
        kbps = int(raw) if raw.isdigit() else None
        changed, self._kbps = kbps != self._kbps, kbps
        return changed


def build_node(
    config: Config,
    *,
    host: Host | None = None,
    backend: Backend | None = None,
    fetch: Fetch | None = None,
    clock: Clock | None = None,
    tickets: TicketRedeemer | None | _Default = DEFAULT,
    enforcement: EnforcementSet | None | _Default = DEFAULT,
    store: Store | None = None,
) -> Node:
    """Build the node described by ``config``, with any collaborator replaced.

    ``backend`` defaults to ``slivers.backend``'s (the account backend on ``host``, or the hollow
    one); ``enforcement`` to the enforcers ``[enforce]`` turns on (none for a hollow backend;
    ``None`` disables enforcement); ``fetch`` to the authority client of ``[authority]``;
    ``tickets`` to the verifier of ``authority.ticket_cert`` (``None``: tickets refused);
    ``store`` to an unopened store in ``node.data_dir`` (the crash simulation passes one that
    can die at a commit). With the authority client of ``[authority]`` (no ``fetch`` given) and
    ``authority.blocking_wait`` > 0, the node also gets the watcher that keeps a blocking query
    open to an authority offering them (:mod:`.authority.watch`). Nothing is started or opened:
    see :meth:`Node.start`."""
    clock = clock or SystemClock()
    host = host or Host()
    datadir = DataDir(config.data_dir)
    store = store if store is not None else Store(datadir.store_path, deferred=True)
    cap = NodeCap(store)
    prefix = config.slivers.name_prefix

    def account_of(name: str) -> str:
        return prefix + name

    hollow = backend.kind == "hollow" if backend is not None else config.slivers.backend == "hollow"
    if isinstance(enforcement, _Default):
        enforcement = None if hollow else EnforcementSet.from_config(config, host)
    hooks = None if enforcement is None else EnforcementHooks(enforcement, cap, account_of)
    if backend is None:
        backend = _backend_from_config(config, host, hooks)
    pool = WorkerPool(config.slivers.workers, start=False)
    metrics = NodeMetrics(store=store, queue_depth=pool.depth, backend=backend.kind)
    loop = None
    operations: SliverOperations | None = None
    # the lease schedule: it pokes the enforcement loop (built next) when the holder changes, and
    # hands the slivers it thaws to their workers for the starts deferred while they were frozen
    leases = LeaseScheduler(store, clock, freezer=None if enforcement is None else CgroupFreezer(enforcement),
                            logins=_login_lock(backend), account_of=account_of,
                            on_lease_change=lambda: loop.poke() if loop is not None else None,
                            on_thawed=lambda names: _start_deferred(store, pool, operations, names))
    if enforcement is not None:
        home_root = Path(config.slivers.home_root)
        loop = EnforcementLoop(enforcement, store, home_of=lambda name: home_root / account_of(name),
                               node_cap_kbps=cap, account_prefix=prefix,
                               on_error=metrics.enforcement_error, lease_holder=lambda: leases.holder)
    bwmon = None if loop is None or enforcement is None else ByteBudgetMonitor(
        store, enforcement, config.bwmon, node_cap_kbps=cap, on_change=loop.poke,
        on_event=metrics.byte_budget_event, clock=clock.now)
    operations = SliverOperations(store, backend, clock, node_cap_kbps=cap,
                                  on_change=loop.poke if loop is not None else None,
                                  on_failure=metrics.sliver_failed, lease_frozen=leases.is_frozen)
    # The sync loop's wake-up flag, made here so that the watcher can set it (a change arrived)
    # without a reference to the Node it is part of.
    wake = threading.Event()
    watcher = None
    if fetch is None:
        client = AuthorityClient.from_config(config)
        fetch = client.fetch
        if config.authority.blocking_wait > 0 and offers_blocking(config.authority.url):
            watcher = AuthorityWatcher(
                client, wait=config.authority.blocking_wait,
                on_change=wake.set,
                on_outcome=metrics.authority_wait, on_mode=_watch_mode_recorder(store, metrics, config),
            )
    syncer = Syncer(
        store=store, backend=backend, operations=operations, pool=pool,
        fetch=fetch,
        clock=clock, max_delete_fraction=config.sync.max_delete_fraction,
        confirm_after=config.sync.confirm_after,
        document_handlers=[*document_handlers_from_config(config, host=host, store=store, hollow=hollow),
                           LeaseHandler(store, on_change=leases.poke)],
        on_handler_error=metrics.handler_failed,
        frozen=leases.wanted_frozen,
    )
    if isinstance(tickets, _Default):
        tickets = ticket_redeemer_from_config(config, store=store, operations=operations, pool=pool, clock=clock)
    api = NodeManagerApi(
        store=store, pool=pool, operations=operations,
        resolve_caller=caller_resolver(store, host.getpwuid, config.api.observers), node_cap_kbps=cap,
        tickets=None if tickets is None else CountedRedeemer(tickets, metrics),
        on_loans_changed=loop.poke if loop is not None else (lambda: None),
    )
    server = None
    if config.api.tcp or config.api.unix_socket:
        server = ApiServer(api.dispatch_deferred, tcp=config.api.tcp, unix_socket=config.api.unix_socket,
                           max_request_bytes=config.api.max_request_bytes, on_request=metrics.api_request)
    return Node(config=config, datadir=datadir, store=store, host=host, backend=backend, cap=cap,
                enforcement=enforcement, enforcement_loop=loop, operations=operations, pool=pool,
                syncer=syncer, api=api, api_server=server, metrics=metrics, clock=clock, leases=leases,
                bwmon=bwmon, watcher=watcher, wake_event=wake)


def _watch_mode_recorder(store: Store, metrics: NodeMetrics, config: Config) -> Callable[[bool], None]:
    """The watcher's ``on_mode``: the gauge, and the line ``status`` shows (from its thread)."""
    a = config.authority

    def record(watching: bool) -> None:
        metrics.authority_mode(watching)
        store.set_meta({Meta.AUTHORITY_WATCH: f"watching: blocking queries of up to {a.blocking_wait} s"
                        if watching else "polling: the authority sent no index (it offers no blocking queries)"})

    return record


def _polling_reason(config: Config) -> str:
    """Why a node without a watcher only polls (``status``)."""
    if config.authority.blocking_wait == 0:
        return "polling: authority.blocking_wait = 0"
    if not offers_blocking(config.authority.url):
        return "polling: this source (a file, or slivers.json) offers no blocking queries"
    return "polling: no authority client of its own (a replaced fetch)"


def _start_deferred(store: Store, pool: WorkerPool, operations: SliverOperations | None,
                    names: Iterable[str]) -> None:
    """Queue, on each thawed sliver's worker, the start deferred while a lease froze it
    (``start_pending``; ``SliverOperations.start_deferred`` re-checks it when the job runs). Its own
    job kind, so a queued sync ``ensure`` does not replace it. Called from the lease thread."""
    if operations is None:
        return
    ops = operations
    for name in names:
        state = store.account(name)
        if state is None or not state.start_pending:
            continue
        logger.info("sliver=%s event=deferred-start-queued reason=thawed", name)
        pool.submit(name, "start-deferred", _bound(ops.start_deferred, name))


def _bound(run: Callable[[str], None], name: str) -> Callable[[], None]:
    return lambda: run(name)


def _login_lock(backend: Backend) -> AccountLoginLock | None:
    """Logins of lease-frozen slivers are locked through the account backend (none: hollow)."""
    from .backends.account import AccountBackend

    return AccountLoginLock(backend) if isinstance(backend, AccountBackend) else None


def _backend_from_config(config: Config, host: Host, hooks: EnforcementHooks | None) -> Backend:
    if config.slivers.backend == "hollow":
        from .backends.hollow import HollowBackend

        return HollowBackend(uid_base=config.slivers.uid_base)
    from .backends.account import AccountBackend

    return AccountBackend.from_config(config, host, hooks=hooks)


@dataclass
class _Running:
    """What :meth:`Node.start` brought up, so :meth:`Node.close` undoes exactly that."""

    locked: bool = False
    store: bool = False
    api: bool = False
    loop: bool = False
    metrics: bool = False
    leases: bool = False
    bwmon: bool = False
    watcher: bool = False


class Node:
    """The assembled node manager. Built by :func:`build_node`; see the module docstring.

    Threads: ``start``/``run``/``close`` from one thread (the main one); ``stop`` and
    ``poll_now`` from anywhere, signal handlers included (they only set flags)."""

    def __init__(
        self, *, config: Config, datadir: DataDir, store: Store, host: Host, backend: Backend,
        cap: NodeCap, enforcement: EnforcementSet | None, enforcement_loop: EnforcementLoop | None,
        operations: SliverOperations, pool: WorkerPool, syncer: Syncer, api: NodeManagerApi,
        api_server: ApiServer | None, metrics: NodeMetrics, clock: Clock,
        leases: LeaseScheduler | None = None, bwmon: ByteBudgetMonitor | None = None,
        watcher: AuthorityWatcher | None = None, wake_event: threading.Event | None = None,
    ) -> None:
        """``wake_event``: the flag that ends the loop's wait between polls (``poll_now``), when a
        collaborator built with the node must be able to set it (the watcher); else a new one."""
        self.config = config
        self.datadir = datadir
        self.store = store
        self.host = host
        self.backend = backend
        self.cap = cap
        self.enforcement = enforcement
        self.enforcement_loop = enforcement_loop
        self.operations = operations
        self.pool = pool
        self.syncer = syncer
        self.api = api
        self.api_server = api_server
        self.metrics = metrics
        self.clock = clock
        self.leases = leases
        self.bwmon = bwmon
        self.watcher = watcher
        self.stop_event = threading.Event()
        self.wake_event = wake_event if wake_event is not None else threading.Event()
        self._running = _Running()
        #: Called after every cycle with its outcome (the demo prints; tests wait on it).
        self.on_sync: list[Callable[[SyncOutcome], None]] = []

    # --- bringing it up -----------------------------------------------------------------------
    def start(self, *, serve: bool = True) -> None:
        """Take the lock, open the store, check the machine, start the workers and, with
        ``serve``, the API, the enforcement loop and the metrics exporter (``sync --once`` does
        without them). On failure, whatever was started is stopped again and the error raised."""
        try:
            self.datadir.lock()
            self._running.locked = True
            self._open_store()
            self._check_machine()
            self.pool.start()
            if serve:
                self._serve()
        except BaseException:
            self.close()
            raise

    def attach(self) -> None:
        """Open the store without the lock, for commands that only read (``plan``, ``status``)
        beside a running daemon. Raises ``NodeManagerError`` when there is no store yet."""
        if not self.datadir.store_path.exists():
            raise NodeManagerError(
                f"no store at {self.datadir.store_path}: the node manager has not run with this configuration yet"
            )
        self.store.open()
        self._running.store = True
        self.cap.refresh()

    def _open_store(self) -> None:
        corrupt = self.store.open()
        self._running.store = True
        if corrupt:
            logger.critical(
                "event=store-corrupt reason=%s action=started-empty "
                "(nothing will be destroyed; records are rebuilt from the next authority document "
                "and our marked accounts are adopted)", corrupt,
            )
            self.store.set_meta({Meta.ADOPT: "1"})
        self.store.set_meta({Meta.BACKEND: self.backend.kind})
        if self.backend.kind == "hollow":
            logger.warning("event=hollow-backend note=records-only,no-accounts-are-created")
        self.metrics.restore(self.store)
        self.refresh_cap()

    def _check_machine(self) -> None:
        """What enforcement and sshd can do here, logged and kept for ``status``."""
        if self.enforcement is None:
            self.store.set_meta({Meta.ENFORCEMENT: "none: the hollow backend creates nothing to enforce"
                                 if self.backend.kind == "hollow" else "none: enforcement is disabled"})
        else:
            self.enforcement.probe()
            # no worker runs yet: nothing is being stopped; what the lease schedule freezes stays so
            leases = self.leases
            self.enforcement.thaw_stops_cut_short(
                keep=() if leases is None else {leases.account_of(n) for n in leases.wanted_frozen()})
            for resource, mechanism in sorted(self.enforcement.describe().items()):
                logger.info("event=enforcement resource=%s mechanism=%r", resource, mechanism)
            self.store.set_meta({Meta.ENFORCEMENT: "; ".join(self.enforcement.problems()) or "ok"})
        self.store.set_meta({Meta.SSHD: ""})
        self._check_sshd()

    def _check_sshd(self) -> None:
        """Whether sshd reads only the node's keys for sliver accounts (README, "Security
        model"). sshd can only be asked about an existing sliver account, so the answer stays
        unknown ("") until there is one; then it is asked once per start."""
        from .backends.account import AccountBackend

        if not isinstance(self.backend, AccountBackend) or self.store.get_meta(Meta.SSHD):
            return
        if not any(state.owned and state.uid is not None for state in self.store.accounts().values()):
            return
        found = self.backend.sshd_problems()
        for problem in found:
            logger.error("event=sshd-not-set-up problem=%r", problem)
        self.store.set_meta({Meta.SSHD: "; ".join(found) or "ok"})

    def _serve(self) -> None:
        if self.api_server is not None:
            self.api_server.start()
            self._running.api = True
        if self.enforcement_loop is not None:
            self.enforcement_loop.start()  # with it, placement at once (the process-events listener)
            self._running.loop = True
            if self.enforcement is not None:  # the listener can fail where its probe succeeded
                self.store.set_meta({Meta.ENFORCEMENT: "; ".join(self.enforcement.problems()) or "ok"})
        if self.leases is not None:
            self.leases.start()
            self._running.leases = True
        if self.bwmon is not None:
            self.bwmon.start()
            self._running.bwmon = True
        try:
            self.metrics.start_http(self.config.metrics.listen)
            self._running.metrics = True
        except NodeManagerError as exc:  # slivers matter more than their statistics
            logger.error("event=metrics-unavailable error=%s", exc)

    def refresh_cap(self) -> None:
        """Re-read the node's bandwidth cap; enforcement follows a change at once."""
        if self.cap.refresh() and self.enforcement is not None:
            self.enforcement.set_node_cap(self.cap())
            if self.enforcement_loop is not None:
                self.enforcement_loop.poke()

    # --- working ------------------------------------------------------------------------------
    def sync_once(
        self, *, allow_mass_delete: bool = False, wait: bool = True, retry_now: bool = False
    ) -> SyncOutcome:
        """One cycle (see ``Syncer.run_once``); never raises for a failure of the cycle: a
        failed cycle is a failed outcome."""
        outcome = self.syncer.run_once(
            allow_mass_delete=allow_mass_delete, wait=wait, before_submit=self.refresh_cap, retry_now=retry_now,
        )
        self.metrics.sync_finished(outcome)
        try:
            if outcome.ok and self.syncer.authority_seen and self.store.get_meta(Meta.ADOPT):
                self.store.set_meta({Meta.ADOPT: ""})
            self._check_sshd()
        except NodeManagerError as exc:  # the store is failing: the cycle said so already
            logger.error("event=after-sync-failed error=%s", exc)
        for hook in self.on_sync:
            try:
                hook(outcome)
            except Exception:  # noqa: BLE001 - an observer must not stop the node
                logger.exception("event=on-sync-hook-failed")
        return outcome

    def plan(self) -> tuple[SyncOutcome, list[Action]]:
        """What a cycle would do now, without doing it (``nodemanager plan``): fetch and merge
        the authority's document, then plan against the machine. Needs :meth:`attach`."""
        return self.syncer.dry_run()

    def poll_now(self) -> None:
        """Ask the loop to poll at once (``nodemanager sync`` / SIGUSR1)."""
        self.wake_event.set()

    def stop(self) -> None:
        """Ask the loop to end (SIGTERM/SIGINT). Safe from a signal handler: only sets flags."""
        self.stop_event.set()
        self.wake_event.set()

    def run(self) -> None:
        """Start (unless started) and poll until stopped. A failed cycle, of whatever kind, is
        logged, counted and retried with backoff; nothing but :meth:`stop` ends the loop.
        In-flight operations finish; pending ones are dropped cleanly."""
        a = self.config.authority
        failures = 0
        try:
            if not self._running.locked:
                self.start()
            logger.info("event=daemon-started backend=%s workers=%d", self.backend.kind, self.pool.workers)
            self._start_watcher()
            sd_notify("READY=1")
            while not self.stop_event.is_set():
                outcome = self.sync_once(wait=False)
                if self.watcher is not None:
                    self.watcher.poke()  # the document may have brought (or dropped) an index
                failures = 0 if outcome.ok else failures + 1
                if failures:
                    delay = backoff_delay(failures, FAILED_POLL_RETRY_S, float(a.poll_interval), random.random)
                else:
                    delay = next_poll_delay(a.poll_interval, a.poll_jitter, random.random)
                self._sleep(delay)
                self.wake_event.clear()
        finally:
            self.close()

    def _start_watcher(self) -> None:
        """Start the blocking-query watcher beside the sync loop (or record why there is none)."""
        self._running.watcher = True  # close() clears the status line: no daemon, no watching
        if self.watcher is None:
            self.metrics.authority_mode(False)
            self.store.set_meta({Meta.AUTHORITY_WATCH: _polling_reason(self.config)})
            return
        self.store.set_meta({Meta.AUTHORITY_WATCH: "polling: no document with an index yet"})
        self.watcher.start()

    def _sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds or until woken, in short slices. Python runs signal handlers
        only in the main thread, and a signal the kernel delivers to another thread does not
        interrupt the main thread's wait: one long wait would delay SIGUSR1 (prompt sync), SIGHUP
        (log reopen) and SIGTERM by up to a whole poll period."""
        deadline = time.monotonic() + delay
        while not self.wake_event.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wake_event.wait(min(left, SIGNAL_CHECK_S))

    def close(self) -> None:
        """Undo :meth:`start` (idempotent): stop serving, let in-flight operations finish, drop
        pending ones, close the store, release the lock."""
        running = self._running
        if not (running.locked or running.store):
            return
        logger.info("event=daemon-stopping action=finishing-in-flight-operations")
        sd_notify("STOPPING=1")
        if running.watcher:
            if self.watcher is not None:
                self.watcher.stop()  # gives up its blocking query at once
            try:
                self.store.set_meta({Meta.AUTHORITY_WATCH: ""})
            except NodeManagerError as exc:
                logger.error("event=store-unwritable-at-stop error=%s", exc)
        if running.metrics:
            self.metrics.stop()
        if running.api and self.api_server is not None:
            self.api_server.stop()
        if running.leases and self.leases is not None:
            self.leases.stop()
        if running.bwmon and self.bwmon is not None:
            self.bwmon.stop()
        if running.loop and self.enforcement_loop is not None:
            self.enforcement_loop.stop()
        self.pool.shutdown(cancel_pending=True)
        self.store.close()
        self.datadir.unlock()
        self._running = _Running()
        logger.info("event=daemon-stopped")
