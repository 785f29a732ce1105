"""One hollow node of the fleet simulator: the node's real document path, without its threads.

A hollow node of ``nodemanager fleet simulate`` (``fleet``) applies each new authority document
exactly as a daemon with the hollow backend does, by running the daemon's own :class:`Syncer`:
``authority.parse.load_document`` (parse and validation, the node-id check), then
``core.desired.merge_document`` (timestamp rule, safety valve) persisted in the node's own SQLite
:class:`Store`, ``core.plan.plan_actions``, and each action through :class:`SliverOperations` on a
:class:`HollowBackend`. Nothing of that path is re-implemented here.

Why not ``daemon.build_node``: it builds, per node, a worker pool (its threads), a Prometheus
registry, a lease scheduler and the API -- about 70 KB per node before any thread starts
(measured), then the pool's threads -- none of which a hollow node in a fleet run exercises. This module is therefore the simulator's composition root for one
node, and what differs from ``build_node`` is only what would cost a thread or an open file per
node:

* the worker pool is :class:`InlinePool`: a job runs in the submitting thread, at once. The daemon
  needs a pool so that a slow ``useradd`` of one sliver does not hold the others; a hollow
  backend's operations take microseconds, and one thread per node would cost 10,000 threads.
  Operations of one sliver still never overlap (they run one after the other), which is the
  pool's contract;
* the store is opened for the application of a document and closed after it: an idle node holds
  no SQLite connection (measured: an open connection with its page cache and WAL index costs
  about 180 KB, the whole hollow node without it about 4 KB; opening -- two connections, the
  quick_check and the schema check -- and closing cost about 1 ms of a 2.3 ms application);
* no document handlers (admin keys and configuration files are off for a hollow backend in the
  daemon too) and no lease schedule (it would need a thread per node; leases are not what a fleet
  run measures);
* the document is not fetched by ``AuthorityClient``: the simulator's asyncio loop fetched it
  (:mod:`.wire`), and :meth:`HollowNode.apply` hands it to the Syncer as its ``fetch``.

Threads: :meth:`HollowNode.apply` runs on one of the simulator's few application threads, never
concurrently for the same node (the node's coroutine awaits it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..authority.parse import load_document, parse_getslivers_with_protection
from ..backends.hollow import HollowBackend
from ..clock import Clock
from ..core.errors import StoreError
from ..core.records import AuthorityDocument
from ..operations import SliverOperations
from ..store import Store
from ..sync import SyncOutcome, Syncer
from ..workers import Completion

logger = logging.getLogger(__name__)

#: Largest document a hollow node accepts (the daemon's default cap is larger; a fleet's
#: per-node documents are small, and the cap bounds the simulator's memory).
MAX_DOCUMENT_BYTES = 16 << 20


class InlinePool:
    """A ``WorkerPool`` stand-in that runs each job in the submitting thread, at once.

    Stateless, so one instance serves every hollow node. See the module docstring for why."""

    workers = 1

    def submit(self, name: str, kind: str, run: Callable[[], Any], *,
               replaces: frozenset[str] = frozenset()) -> Completion:
        """Run ``run`` now; its result or exception is the returned Completion's."""
        try:
            return Completion.resolved(run())
        except Exception as exc:  # noqa: BLE001 - handed to the waiter, as the pool does
            return Completion.resolved(error=exc)

    def depth(self) -> int:
        return 0


INLINE_POOL = InlinePool()


class HollowNode:
    """One simulated node: its id, its store file, its hollow backend and the daemon's Syncer."""

    __slots__ = ("node_id", "url", "store", "backend", "syncer", "_body", "applied",
                 "errors", "last_error", "index", "blocking")

    def __init__(self, node_id: int, url: str, store_path: Path, clock: Clock) -> None:
        """``url`` is the authority source (it chooses the parser, as in the daemon);
        nothing is opened here."""
        self.node_id = node_id
        self.url = url
        self.store = Store(store_path, deferred=True)
        self.backend = HollowBackend()
        operations = SliverOperations(self.store, self.backend, clock)
        self.syncer = Syncer(store=self.store, backend=self.backend, operations=operations,
                             pool=INLINE_POOL,  # type: ignore[arg-type]  # duck-typed pool
                             fetch=self._parse, clock=clock)
        self._body: tuple[bytes | None, Mapping[str, Any] | None] = (None, None)
        #: Documents applied, failures seen (fetch or apply) and the last failure's text.
        self.applied = 0
        self.errors = 0
        self.last_error = ""
        #: The authority's index of the document held (None: none seen, the node polls).
        self.index: str | None = None
        #: True once the authority offered blocking queries (it sent an index).
        self.blocking = False

    def _parse(self) -> tuple[AuthorityDocument, frozenset[str]]:
        """The Syncer's ``fetch``: the document handed to :meth:`apply`, through the node's
        parser (``load_document``), or, when the XML-RPC answer was already decoded to read its
        index, through the validation that ``load_document`` runs after decoding."""
        body, data = self._body
        self._body = (None, None)
        if data is not None:
            return parse_getslivers_with_protection(data, expected_node_id=self.node_id)
        assert body is not None, "apply() hands the document over"
        return load_document(self.url, body, expected_node_id=self.node_id, max_bytes=MAX_DOCUMENT_BYTES)

    def apply(self, body: bytes, data: Mapping[str, Any] | None = None) -> SyncOutcome:
        """Run one sync cycle of the daemon on the document ``body`` (``data``: the same XML-RPC
        answer already decoded): parse, validate, merge, persist, plan, operate. Opens the store
        for the cycle and closes it after. Never raises for the cycle's own failure (a rejected
        document is a failed outcome, as in the daemon); a store that cannot be opened raises
        :class:`StoreError`."""
        corrupt = self.store.open()
        if corrupt:
            logger.error("event=store-corrupt node_id=%d reason=%s action=started-empty", self.node_id, corrupt)
        try:
            self._body = (body, data)
            return self.syncer.run_once(wait=True)
        finally:
            self._body = (None, None)
            self.store.close()

    def slivers(self) -> dict[str, Any]:
        """The node's stored sliver records (opens and closes the store; for tests and reports)."""
        self.store.open()
        try:
            return self.store.slivers()
        finally:
            self.store.close()


__all__ = ["INLINE_POOL", "HollowNode", "InlinePool", "StoreError"]
