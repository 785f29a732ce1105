"""``nodemanager fleet simulate``: thousands of hollow node managers against one authority.

Like Kubernetes' kubemark (hollow kubelets against a real control plane), the simulator runs N
hollow nodes -- each with its own node id, node key and SQLite store, the hollow backend, and the
node's real document path (:mod:`.node`) -- against one authority, to measure the authority
and the propagation of a change through a fleet on one machine.

Shape (why it is cheap per node):

* ONE asyncio loop holds every node's request: a node is a coroutine, not a thread. Each node
  speaks the blocking-query protocol (docs/blocking-queries.md) through the node's own pure
  request/answer functions (``authority.blocking``) over the project's asyncio HTTP client
  (``http.aclient.arequest``): a first ``GetSlivers`` (or slices.xml GET), then, once the
  authority sent an index, one outstanding wait at a time; against an authority that sends no
  index it polls every ``poll`` seconds plus jitter, as the daemon does.
* Applying a document is CPU work (parse, merge, SQLite): it runs off the loop on a small,
  fixed pool of ``appliers`` threads, so the loop keeps serving the waits. The pool's queue is
  bounded by the fleet itself (a node awaits its application before asking again: at most one
  document per node is queued).
* Start-up is spread over ``ramp`` seconds (each node starts at a random point of it), and
  failures back off per node with jitter (``core.retry.backoff_delay``), so 10,000 nodes never
  connect in the same millisecond, nor come back together after an authority restart.
* ``processes`` > 1 runs shares of the nodes in child processes of this same command (``fleet``
  is CPU-bound in its appliers; one Python process uses one core for them).

The report (``--report FILE``) is JSON lines, one per node per document handled, appended with
``O_APPEND`` in whole-line writes so that several processes can share one file::

    {"event": "applied", "node_id": 7, "timestamp": 1700000000, "nm_index": "Xy..", "slivers": 4,
     "monotonic": 1234.5, "wall": 1700000001.2}

``event`` is ``applied`` (a good document merged), ``stale`` (older than what the node holds:
ignored, as the daemon does) or ``error`` (with ``error``: fetch, authentication or document
failure). ``monotonic`` is ``CLOCK_MONOTONIC`` (comparable between processes of one machine).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import resource
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..authority.parse import KIND_XMLRPC, document_kind
from ..clock import SystemClock
from ..core.errors import ConfigError, NodeManagerError
from ..core.retry import backoff_delay
from .node import HollowNode
from .wire import Answer, NodeExchange, Reading, check_authority_url
from ..sync import SyncOutcome, SyncResult

logger = logging.getLogger(__name__)

#: After a failure, retry after 1 s doubling up to 60 s (jittered, per node).
RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0
#: How often buffered report lines are written out.
REPORT_FLUSH_S = 0.1
#: Failures kept in the summary as examples.
SAMPLE_ERRORS = 5


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """What ``fleet simulate`` was asked to do (its options; see :mod:`.cli`)."""

    authority: str
    nodes: int
    first_node_id: int = 1
    #: Blocking wait asked of the authority, seconds (0: never wait, poll).
    wait: int = 300
    #: Poll period against an authority without blocking queries, plus 0..poll/2 jitter.
    poll: float = 600.0
    #: Seconds to run (0: until stopped).
    duration: float = 0.0
    #: Seconds over which node start-ups are spread (None: nodes / 1000).
    ramp: float | None = None
    #: Request timeout beyond the wait (a dead connection is noticed within wait + timeout).
    timeout: float = 30.0
    #: Threads applying documents.
    appliers: int = 2

    def start_spread(self) -> float:
        return self.nodes / 1000.0 if self.ramp is None else self.ramp


@dataclass
class FleetSummary:
    """What a run did (printed at the end; children of ``--processes`` send it as JSON)."""

    nodes: int = 0
    applied: int = 0
    stale: int = 0
    errors: int = 0
    nodes_with_errors: int = 0
    nodes_without_document: int = 0
    nodes_blocking: int = 0
    sample_errors: list[str] = field(default_factory=list)

    def merge(self, other: FleetSummary) -> None:
        for name in ("nodes", "applied", "stale", "errors", "nodes_with_errors",
                     "nodes_without_document", "nodes_blocking"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sample_errors = (self.sample_errors + other.sample_errors)[:SAMPLE_ERRORS]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> FleetSummary:
        data = json.loads(text)
        return FleetSummary(**{k: data[k] for k in FleetSummary.__dataclass_fields__ if k in data})

    def render(self) -> str:
        lines = [f"fleet: {self.nodes} nodes, {self.applied} documents applied, {self.stale} stale, "
                 f"{self.errors} errors on {self.nodes_with_errors} nodes; "
                 f"{self.nodes_blocking} nodes on blocking queries, "
                 f"{self.nodes_without_document} without any document"]
        lines += [f"  error: {text}" for text in self.sample_errors]
        return "\n".join(lines)


def load_keys(path: Path) -> dict[int, str]:
    """Read a keys file: one ``NODE_ID KEY`` pair per line (whitespace between, the key itself
    without spaces); blank lines and lines starting with ``#`` are ignored. A malformed line is
    a :class:`ConfigError` naming it (nothing is started)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--keys {path}: cannot read it: {exc}") from exc
    keys: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) < 1:
            raise ConfigError(f"--keys {path} line {number}: expected 'NODE_ID KEY', got {line[:60]!r}")
        keys[int(parts[0])] = parts[1]
    return keys


def check_settings(settings: FleetSettings, keys: Mapping[int, str]) -> None:
    """Raise :class:`ConfigError` for an authority URL the simulator cannot use, or an XML-RPC
    authority (BootAuth) without a key for every simulated node."""
    check_authority_url(settings.authority)
    if document_kind(settings.authority) != KIND_XMLRPC:
        return
    ids = range(settings.first_node_id, settings.first_node_id + settings.nodes)
    missing = [node_id for node_id in ids if node_id not in keys]
    if missing:
        raise ConfigError(f"no node key for {len(missing)} node(s) (e.g. {missing[0]}): the XML-RPC authority "
                          f"{settings.authority} authenticates each node with its key (--keys FILE)")


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (each waiting node holds a socket);
    return the soft limit obtained."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            logger.warning("event=nofile-limit-unchanged soft=%d hard=%d error=%s", soft, hard, exc)
    return soft


class ReportWriter:
    """Buffers report lines and appends them in whole-line writes (``O_APPEND``): lines of
    several processes sharing the file never interleave within a line."""

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"--report {path}: cannot open it: {exc.strerror or exc}") from exc
        self._lines: list[str] = []

    def add(self, record: Mapping[str, Any]) -> None:
        self._lines.append(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        data = "".join(lines).encode()
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


class Fleet:
    """N hollow nodes and the loop that drives them. Build, then ``await run(stop)``."""

    def __init__(self, settings: FleetSettings, *, keys: Mapping[int, str], data_dir: Path,
                 report: ReportWriter | None = None, rng: Callable[[], float] = random.random) -> None:
        """Raises :class:`ConfigError` for an authority URL the simulator cannot use, or one that
        needs node keys (XML-RPC) that ``keys`` lacks. Opens nothing."""
        self.settings = settings
        self.report = report
        self.rng = rng
        clock = SystemClock()
        self.nodes: list[HollowNode] = []
        self.exchanges: list[NodeExchange] = []
        check_settings(settings, keys)
        for node_id in range(settings.first_node_id, settings.first_node_id + settings.nodes):
            self.exchanges.append(NodeExchange(settings.authority, node_id, keys.get(node_id),
                                               timeout=settings.timeout))
            self.nodes.append(HollowNode(node_id, settings.authority, data_dir / f"node-{node_id}.db", clock))
        self._stale = 0
        self._errors_seen: list[str] = []

    async def run(self, stop: asyncio.Event) -> FleetSummary:
        """Run every node until ``stop`` is set (or ``duration`` passed); then cancel the
        requests, let the documents being applied finish, and summarise."""
        executor = ThreadPoolExecutor(max_workers=max(1, self.settings.appliers), thread_name_prefix="fleet-apply")
        tasks = [asyncio.create_task(self._node(node, exchange, executor))
                 for node, exchange in zip(self.nodes, self.exchanges, strict=True)]
        flusher = asyncio.create_task(self._flush_reports(stop)) if self.report is not None else None
        try:
            if self.settings.duration > 0:
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.duration)
                except TimeoutError:
                    pass
            else:
                await stop.wait()
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # an application in flight finishes (a store is never cut short); queued ones are dropped
            executor.shutdown(wait=True, cancel_futures=True)
            if flusher is not None:
                await asyncio.gather(flusher, return_exceptions=True)
            if self.report is not None:
                self.report.flush()
        return self.summary()

    def summary(self) -> FleetSummary:
        summary = FleetSummary(nodes=len(self.nodes))
        for node in self.nodes:
            summary.applied += node.applied
            summary.errors += node.errors
            summary.nodes_with_errors += node.errors > 0
            summary.nodes_without_document += node.applied == 0
            summary.nodes_blocking += node.blocking
        summary.stale = self._stale
        summary.sample_errors = list(self._errors_seen)
        return summary

    async def _flush_reports(self, stop: asyncio.Event) -> None:
        assert self.report is not None
        while not stop.is_set():
            self.report.flush()
            await asyncio.sleep(REPORT_FLUSH_S)

    # --- one node -----------------------------------------------------------------------------
    async def _node(self, node: HollowNode, exchange: NodeExchange, executor: ThreadPoolExecutor) -> None:
        """One node's life: start at a random point of the ramp; then one exchange after the
        other; poll when the authority offers no blocking queries."""
        settings = self.settings
        await asyncio.sleep(self.rng() * settings.start_spread())
        failures = 0
        while True:
            failures = await self._exchange(node, exchange, executor, failures)
            if not failures and (not node.blocking or settings.wait <= 0):
                await asyncio.sleep(settings.poll + self.rng() * settings.poll / 2)

    async def _exchange(self, node: HollowNode, exchange: NodeExchange, executor: ThreadPoolExecutor,
                        failures: int) -> int:
        """Ask (an ordinary fetch, or a blocking query once the authority sent an index), read
        and apply off the loop; back off after a failure. Returns the failures in a row.

        A coroutine of its own so that the answer, the decoded document and the outcome die when
        it returns: held in ``_node``'s frame during the next wait, they would cost each idle node
        about 10 KB."""
        waiting = node.index is not None and self.settings.wait > 0
        try:
            answer = await exchange.ask(node.index if waiting else None, self.settings.wait)
            handled = await asyncio.get_running_loop().run_in_executor(
                executor, _read_and_apply, node, exchange, answer)
        except Exception as exc:  # noqa: BLE001 - one node's failure, of any kind, stays that node's
            if not isinstance(exc, NodeManagerError):
                logger.exception("event=fleet-node-bug node_id=%d", node.node_id)
            await self._back_off(node, failures + 1, f"{type(exc).__name__}: {exc}")
            return failures + 1
        reading, outcome = handled.reading, handled.outcome
        if outcome is not None and not outcome.ok:  # rejected: logged by the Syncer, as in the daemon
            await self._back_off(node, failures + 1, outcome.message)
            return failures + 1
        if outcome is not None:
            self._applied(node, handled)
        node.index = reading.index
        node.blocking = reading.index is not None and exchange.blocking_ok
        return 0

    async def _back_off(self, node: HollowNode, failures: int, text: str) -> None:
        """After a failure: report it, forget the index (the next request is an ordinary fetch,
        as after a daemon's failed poll) and wait 1 s doubling up to 60 s, jittered."""
        self._error(node, text)
        node.index = None
        await asyncio.sleep(backoff_delay(failures, RETRY_BASE_S, RETRY_CAP_S, self.rng))

    def _applied(self, node: HollowNode, handled: _Handled) -> None:
        outcome = handled.outcome
        assert outcome is not None
        stale = outcome.result is SyncResult.STALE
        if stale:
            self._stale += 1
        else:
            node.applied += 1
        if self.report is not None:
            self.report.add({"event": "stale" if stale else "applied", "node_id": node.node_id,
                             "timestamp": outcome.document_timestamp, "nm_index": handled.reading.index,
                             "slivers": outcome.slivers, "monotonic": round(handled.monotonic, 6),
                             "wall": round(handled.wall, 6)})

    def _error(self, node: HollowNode, text: str) -> None:
        """Count and report a node's failure; log it (and keep it as an example) only when it
        differs from that node's previous one, so that a fleet failing together does not flood."""
        node.errors += 1
        if text != node.last_error:
            node.last_error = text
            if len(self._errors_seen) < SAMPLE_ERRORS:
                self._errors_seen.append(f"node {node.node_id}: {text}")
            logger.warning("event=fleet-node-error node_id=%d error=%s", node.node_id, text)
        if self.report is not None:
            self.report.add({"event": "error", "node_id": node.node_id, "error": text[:300],
                             "monotonic": round(time.monotonic(), 6), "wall": round(time.time(), 6)})


@dataclass(frozen=True, slots=True)
class _Handled:
    reading: Reading
    #: The sync cycle's outcome (None: no document to apply) and when it ended.
    outcome: SyncOutcome | None = None
    monotonic: float = 0.0
    wall: float = 0.0


def _read_and_apply(node: HollowNode, exchange: NodeExchange, answer: Answer) -> _Handled:
    """On an applier thread: read the answer, and apply the document it carries (if any)."""
    reading = exchange.read(answer)
    if reading.body is None:
        return _Handled(reading)
    outcome = node.apply(reading.body, reading.data)
    return _Handled(reading, outcome, time.monotonic(), time.time())


def shares(nodes: int, first_node_id: int, processes: int) -> list[tuple[int, int]]:
    """Split ``nodes`` node ids from ``first_node_id`` into at most ``processes`` contiguous
    shares ``(first id, count)`` whose sizes differ by at most one."""
    processes = max(1, min(processes, nodes))
    base, extra = divmod(nodes, processes)
    out, first = [], first_node_id
    for index in range(processes):
        count = base + (index < extra)
        out.append((first, count))
        first += count
    return out
