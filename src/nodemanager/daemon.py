"""Composition root: config -> store -> host -> backend -> operations -> workers -> sync -> loop.

This is the only module that names concrete adapter classes. Tests and the demo build a
``NodeManager`` with overrides (a fetch function, a backend, a clock) instead of patching.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .api.methods import NodeManagerApi, TicketRedeemer, caller_resolver
from .api.server import ApiServer
from .authority.client import AuthorityClient, next_poll_delay
from .backends.base import Backend
from .clock import Clock, SystemClock
from .config import Config
from .core.authz import Caller
from .core.errors import NodeManagerError, StoreError, TicketRejected
from .health import sd_notify
from .metrics import NodeMetrics
from .enforce.set import EnforcementSet
from .enforcing import EnforcementHooks, EnforcementLoop
from .host import Host
from .operations import SliverOperations
from .store import Store
from .tickets import ticket_redeemer_from_config
from .sync import META_BWCAP, Fetch, SyncOutcome, Syncer
from .workers import WorkerPool

logger = logging.getLogger(__name__)

META_BACKEND = "backend"
META_ADOPT = "adopt_marked_accounts"
#: What resource enforcement could not do on this machine ("ok": everything enforced).
META_ENFORCEMENT = "enforcement_problems"
#: After a failed poll, retry sooner than the poll period: 30 s, 60 s, ... up to the period.
FAILED_POLL_RETRY_S = 30.0
#: Longest the main thread sleeps without checking for signals (see ``NodeManager._sleep``).
SIGNAL_CHECK_S = 0.5


class CountedRedeemer:
    """A ticket redeemer whose rejections are counted by reason (``reason: details`` messages)."""

    def __init__(self, inner: TicketRedeemer, metrics: NodeMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def redeem(self, ticket: str, caller: Caller) -> str:
        try:
            return self.inner.redeem(ticket, caller)
        except TicketRejected as exc:
            self.metrics.ticket_rejected(str(exc).split(":", 1)[0])
            raise


class AlreadyRunning(NodeManagerError):
    """Another node manager process holds the data directory's lock."""


class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/nodemanager.pid`` holding our pid.

    The kernel releases the lock when the process dies, even by ``kill -9``, so a stale pid file
    never blocks a restart, and two daemons can never run on one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "nodemanager.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # e.g. a read-only or full data directory: say so, no traceback
            raise StoreError(f"cannot take the lock {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"another node manager (pid {read_pid(self.path) or '?'}) is running on {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def build_backend(config: Config, host: Host | None = None) -> Backend:
    """The backend named by ``slivers.backend``."""
    if config.slivers.backend == "hollow":
        from .backends.hollow import HollowBackend

        return HollowBackend()
    from .backends.account import AccountBackend

    return AccountBackend.from_config(config, host or Host())


@dataclass
class Overrides:
    """Replacements for tests, the demo and benchmarks."""

    fetch: Fetch | None = None
    backend: Backend | None = None
    clock: Clock | None = None
    tickets: TicketRedeemer | None = None


class NodeManager:
    """The assembled node manager: owns the store, pool and syncer; runs the poll loop."""

    def __init__(self, config: Config, overrides: Overrides | None = None) -> None:
        overrides = overrides or Overrides()
        self.config = config
        self.clock = overrides.clock or SystemClock()
        self.lock = DataDirLock(config.data_dir)
        self.lock.acquire()
        try:
            self.store, corrupt = Store.open_or_quarantine(config.data_dir / "nodemanager.sqlite")
        except BaseException:
            self.lock.release()
            raise
        if corrupt:
            logger.critical(
                "event=store-corrupt reason=%s action=started-empty "
                "(nothing will be destroyed; records are rebuilt from the next authority document "
                "and our marked accounts are adopted)", corrupt,
            )
            self.store.set_meta({META_ADOPT: "1"})
        self.host = Host()
        self.backend = overrides.backend or build_backend(config, self.host)
        if self.backend.kind == "hollow":
            logger.warning("event=hollow-backend note=records-only,no-accounts-are-created")
        self.store.set_meta({META_BACKEND: self.backend.kind})
        self._cap: int | None = None
        self.enforcement_loop: EnforcementLoop | None = None  # built below, once the pool exists
        self.enforcement = self._build_enforcement()
        self._read_cap()
        self.operations = SliverOperations(
            self.store,
            self.backend,
            self.clock,
            node_cap_kbps=self._node_cap,
            adopt_marked=self.store.get_meta(META_ADOPT) == "1",
        )
        self.pool = WorkerPool(config.slivers.workers)
        if self.enforcement is not None:
            from .backends.account import AccountBackend

            assert isinstance(self.backend, AccountBackend)
            self.backend.hooks = EnforcementHooks(self.enforcement, self._node_cap, self.backend.account_name)
            self.enforcement_loop = EnforcementLoop(
                self.enforcement, self.store, home_of=self.backend.home_of, node_cap_kbps=self._node_cap,
                account_of=self.backend.account_name,
            )
            self.operations.on_change = lambda name: self.enforcement_loop.poke()  # type: ignore[union-attr]
        fetch = overrides.fetch
        if fetch is None:
            fetch = AuthorityClient.from_config(config).fetch
        self.syncer = Syncer(
            store=self.store,
            backend=self.backend,
            operations=self.operations,
            pool=self.pool,
            fetch=fetch,
            clock=self.clock,
            max_delete_fraction=config.sync.max_delete_fraction,
            confirm_after=config.sync.confirm_after,
        )
        self.loan_hooks: list[Callable[[], None]] = []
        self.api = NodeManagerApi(
            store=self.store,
            pool=self.pool,
            operations=self.operations,
            resolve_caller=caller_resolver(self.store, self.host.getpwuid),
            node_cap_kbps=self._node_cap,
            on_loans_changed=self._loans_changed,
        )
        self.metrics = NodeMetrics(store=self.store, queue_depth=self.pool.depth, backend=self.backend.kind)
        tickets = overrides.tickets or ticket_redeemer_from_config(
            config, store=self.store, operations=self.operations, pool=self.pool, clock=self.clock
        )
        self.api.tickets = None if tickets is None else CountedRedeemer(tickets, self.metrics)
        if self.enforcement_loop is not None:
            self.enforcement_loop.on_error = self.metrics.enforcement_error
        api = config.api
        self.api_server: ApiServer | None = None
        if api.tcp or api.unix_socket:
            self.api_server = ApiServer(
                self.api.dispatch, tcp=api.tcp, unix_socket=api.unix_socket,
                max_request_bytes=api.max_request_bytes, on_request=self.metrics.api_request,
            )
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.on_sync: list[Callable[[SyncOutcome], None]] = []

    def _node_cap(self) -> int | None:
        """The node's bandwidth cap from the latest document (read once per cycle, not per op)."""
        return self._cap

    def _read_cap(self) -> None:
        raw = self.store.get_meta(META_BWCAP, "")
        cap = int(raw) if raw.isdigit() else None
        changed, self._cap = cap != self._cap, cap
        if self.enforcement is not None:
            self.enforcement.set_node_cap(cap)
            if changed and self.enforcement_loop is not None:
                self.enforcement_loop.poke()

    def _build_enforcement(self) -> EnforcementSet | None:
        """Resource enforcement for real accounts; the hollow backend has nothing to enforce."""
        if self.backend.kind != "account":
            self.store.set_meta({META_ENFORCEMENT: "none: the hollow backend creates nothing to enforce"})
            return None
        enforcement = EnforcementSet.from_config(self.config, self.host)
        for resource, mechanism in sorted(enforcement.describe().items()):
            logger.info("event=enforcement resource=%s mechanism=%r", resource, mechanism)
        # its problems() were logged as it was built; `status` shows them from the store
        self.store.set_meta({META_ENFORCEMENT: "; ".join(enforcement.problems()) or "ok"})
        return enforcement

    def _loans_changed(self) -> None:
        """Loans changed through the API: effective RSpecs moved; enforcement follows now."""
        if self.enforcement_loop is not None:
            self.enforcement_loop.poke()
        for hook in self.loan_hooks:
            hook()

    def start_api(self) -> None:
        """Start serving the API (TCP and/or Unix socket, as configured)."""
        if self.api_server is not None:
            self.api_server.start()
            logger.info("event=api-listening tcp=%s unix=%s", self.api_server.tcp_address,
                        self.api_server.unix_path)

    def sync_once(
        self, *, allow_mass_delete: bool = False, wait: bool = True, retry_now: bool = False
    ) -> SyncOutcome:
        outcome = self.syncer.run_once(
            allow_mass_delete=allow_mass_delete, wait=wait, before_submit=self._read_cap,
            retry_now=retry_now,
        )
        self.metrics.sync_finished(outcome)
        if outcome.ok and self.syncer.authority_seen:
            self.store.set_meta({META_ADOPT: ""})
            self.operations.adopt_marked = False
        for hook in self.on_sync:
            hook(outcome)
        return outcome

    def poll_now(self) -> None:
        """Ask the loop to poll at once (``nodemanager sync`` / SIGUSR1)."""
        self.wake_event.set()

    def stop(self) -> None:
        """Ask the loop to end (SIGTERM/SIGINT). Safe from a signal handler: only sets flags."""
        self.stop_event.set()
        self.wake_event.set()

    def run(self) -> None:
        """Poll until stopped. In-flight operations finish; pending ones are dropped cleanly."""
        a = self.config.authority
        failures = 0
        logger.info("event=daemon-started backend=%s workers=%d", self.backend.kind, self.pool.workers)
        try:
            self.start_api()
            if self.enforcement_loop is not None:
                self.enforcement_loop.start()
            self.start_metrics()
            sd_notify("READY=1")
            while not self.stop_event.is_set():
                try:
                    outcome = self.sync_once(wait=False)
                    failures = 0 if outcome.ok else failures + 1
                except StoreError as exc:
                    failures += 1
                    self.metrics.sync_failed("store-error")
                    logger.error("event=sync-failed error=%s", exc)
                if failures:
                    delay = min(float(a.poll_interval), FAILED_POLL_RETRY_S * 2 ** (failures - 1))
                    delay *= 0.5 + random.random()
                else:
                    delay = next_poll_delay(a.poll_interval, a.poll_jitter, random.random)
                self._sleep(delay)
                self.wake_event.clear()
        finally:
            self.close()

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

    def start_metrics(self) -> None:
        """Serve the metrics on ``metrics.listen`` ("" disables). A port that cannot be bound is
        logged loudly but does not stop the node: slivers matter more than their statistics."""
        try:
            self.metrics.start_http(self.config.metrics.listen)
        except NodeManagerError as exc:
            logger.error("event=metrics-unavailable error=%s", exc)

    def close(self) -> None:
        logger.info("event=daemon-stopping action=finishing-in-flight-operations")
        sd_notify("STOPPING=1")
        self.metrics.stop()
        if self.api_server is not None:
            self.api_server.stop()
        if self.enforcement_loop is not None:
            self.enforcement_loop.stop()
        self.pool.shutdown(cancel_pending=True)
        self.store.close()
        self.lock.release()
        logger.info("event=daemon-stopped")
