"""One sync cycle: authority document -> merged records -> plan -> workers.

Data flows one way (style.md): the fetched document is validated by the authority adapter, merged
into the records by ``core.desired`` (timestamp rule, safety valve), persisted in one transaction,
compared with what the node has applied by ``core.plan``, and the resulting actions are handed to
the per-sliver workers. Nothing here touches the machine directly.

A cycle also runs when the authority is unreachable: the records we hold still drive drift repair,
expiry and retries, while removals of slivers are gated until a good document has been received
since this process started (a node that boots while the authority is down keeps everything).

A document that is merged (not stale) is also handed to each node-wide ``DocumentHandler``
(admin keys, configuration files: the document's ``members``), after the slivers' work is handed
out; a handler that fails is logged and counted, and never fails the sync or the slivers.

A cycle never raises for its own failure: a sliver's failed operation is that sliver's outcome
(``operations`` recorded and logged it), and anything else that goes wrong -- the store, a bug --
ends the cycle as a failed :class:`SyncOutcome` (result ``ERROR``), logged with its traceback,
which is never recorded as a good sync.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from .backends.base import Backend
from .clock import Clock
from .core.desired import MergeResult, merge_document
from .core.errors import AuthorityError, DocumentRejected, NodeManagerError
from .core.plan import Action, ActionKind, plan_actions
from .core.records import AuthorityDocument, Rejection, Sliver
from .datadir import Meta
from .operations import SliverOperations
from .store import Store
from .workers import Completion, WorkerPool

logger = logging.getLogger(__name__)

Fetch = Callable[[], tuple[AuthorityDocument, frozenset[str]]]


class DocumentHandler(Protocol):
    """A node-wide consumer of accepted authority documents (not of slivers): it validates the
    member it handles from ``doc.members`` itself, applies it, and records what ``status`` shows.
    Called from the sync thread, one document at a time, only for documents merged (never for a
    stale or rejected one)."""

    #: Short name for the log and metrics ("admin_keys", "conf_files").
    name: str

    def apply(self, doc: AuthorityDocument) -> None: ...


class SyncResult(str, Enum):
    """How one cycle went (metrics label ``outcome``, ``status``)."""

    OK = "ok"
    #: The document was older than the data already held: ignored, the cycle is still good.
    STALE = "stale"
    #: The authority answered garbage (malformed as a whole): nothing changed.
    REJECTED = "rejected"
    #: The authority could not be reached or faulted: the last good state is kept.
    UNAVAILABLE = "authority-unavailable"
    #: The cycle itself failed (the store, a bug): logged with its traceback.
    ERROR = "error"


@dataclass
class SyncOutcome:
    """What one cycle did, for the log, ``status``, metrics and the CLI."""

    ok: bool
    message: str
    document_timestamp: int | None = None
    #: Slivers the fetched document lists (valid entries) and entries it had rejected.
    slivers: int = 0
    rejected: int = 0
    upserts: int = 0
    deletes: int = 0
    held: tuple[str, ...] = ()
    valve_tripped: bool = False
    #: The document's rejected entries (label and reason; ``rejected`` counts them).
    rejections: tuple[Rejection, ...] = ()
    actions: list[Action] = field(default_factory=list)
    completions: dict[str, Completion] = field(default_factory=dict)
    duration_s: float = 0.0
    #: How the cycle went (``ok`` is True for OK and STALE only).
    result: SyncResult = SyncResult.OK

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for action in self.actions:
            kinds[action.kind.value] = kinds.get(action.kind.value, 0) + 1
        done = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no changes"
        held = f"; {len(self.held)} removals HELD by the safety valve" if self.held else ""
        rejected = f"; {self.rejected} entries rejected" if self.rejected else ""
        return f"{self.message}: {done}{held}{rejected}"


class Syncer:
    """Runs sync cycles. Called from one thread at a time (the daemon's loop or the CLI)."""

    def __init__(
        self,
        *,
        store: Store,
        backend: Backend,
        operations: SliverOperations,
        pool: WorkerPool,
        fetch: Fetch,
        clock: Clock,
        max_delete_fraction: float = 0.5,
        confirm_after: int = 2,
        document_handlers: Sequence[DocumentHandler] = (),
        on_handler_error: Callable[[str], None] = lambda name: None,
        frozen: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """``frozen()``: the slivers the lease schedule keeps frozen now (``leasing``); the plan
        leaves their deferred starts pending."""
        self.store = store
        self.frozen = frozen
        self.document_handlers = tuple(document_handlers)
        self.on_handler_error = on_handler_error
        self.backend = backend
        self.operations = operations
        self.pool = pool
        self.fetch = fetch
        self.clock = clock
        self.max_delete_fraction = max_delete_fraction
        self.confirm_after = confirm_after
        #: The deletion gate: no sliver is destroyed for being absent until a good document has
        #: been received since this process started.
        self.authority_seen = False

    # --- the pieces ----------------------------------------------------------------------
    def _fetch(self) -> tuple[AuthorityDocument, frozenset[str]]:
        """Fetch and parse with the cyclic garbage collector paused.

        A 10,000-sliver document allocates about a million objects, none of them in reference
        cycles; left on, the collector would walk the daemon's whole heap several times while
        they are made (measured: 10-20 % of the parse, and seconds once the heap is large)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self.fetch()
        finally:
            if enabled:
                gc.enable()

    def merge(self, doc: AuthorityDocument, protected: frozenset[str], *, allow_mass_delete: bool) -> MergeResult | None:
        """Merge ``doc`` into the stored records (not persisted). None for a stale document."""
        last = int(self.store.get_meta(Meta.AUTHORITY_TIMESTAMP, "0") or 0)
        if doc.timestamp < last:
            logger.warning(
                "event=stale-document timestamp=%d newest_seen=%d action=ignored", doc.timestamp, last
            )
            return None
        return merge_document(
            self.store.slivers(),
            doc,
            self.store.valve(),
            max_delete_fraction=self.max_delete_fraction,
            confirm_after=self.confirm_after,
            allow_mass_delete=allow_mass_delete,
            protected=protected,
        )

    def _plan(
        self, records: dict[str, Sliver] | None, *, retry_now: bool = False, may_destroy: bool | None = None
    ) -> tuple[list[Action], set[str]]:
        accounts = self.store.accounts()
        observed = self.backend.observe()
        actions = plan_actions(
            self.store.slivers() if records is None else records,
            accounts,
            observed,
            self.clock.now(),
            may_destroy_orphans=self.authority_seen if may_destroy is None else may_destroy,
            honour_backoff=not retry_now,
            frozen=self.frozen(),
        )
        fresh = {
            a.name for a in actions
            if a.kind is ActionKind.CREATE and a.name not in observed
            and not ((state := accounts.get(a.name)) is not None and state.owned)
        }
        return actions, fresh

    def dry_run(self) -> tuple[SyncOutcome, list[Action]]:
        """Fetch and merge the authority's document and plan against the machine, changing
        nothing (``nodemanager plan``). The outcome says what the document was; the actions are
        what a cycle would hand to the workers."""
        doc, protected = self.fetch()
        merged = self.merge(doc, protected, allow_mass_delete=False)
        outcome = _document_outcome(doc, merged)
        if merged is not None:
            outcome.held, outcome.valve_tripped = merged.held, merged.valve_tripped
        actions, _ = self._plan(merged.records if merged is not None else None, may_destroy=True)
        return outcome, actions

    def submit(self, action: Action) -> Completion:
        """Hand one action to the sliver's worker."""
        ops = self.operations
        if action.kind is ActionKind.DESTROY:
            return self.pool.submit(action.name, "destroy", lambda: ops.destroy(action.name))
        if action.kind is ActionKind.CONFLICT:
            return self.pool.submit(
                action.name, "conflict", lambda: ops.report_conflict(action.name, action.reason)
            )
        sliver = action.sliver
        assert sliver is not None
        return self.pool.submit(action.name, "ensure", lambda: ops.ensure(sliver, action.start))

    # --- a cycle -------------------------------------------------------------------------
    def run_once(
        self,
        *,
        allow_mass_delete: bool = False,
        wait: bool = False,
        before_submit: Callable[[], None] | None = None,
        retry_now: bool = False,
    ) -> SyncOutcome:
        """Fetch, merge, persist, plan and submit. With ``wait``, return after the work is done.

        ``before_submit`` runs after the document is persisted and before any work is handed out
        (the daemon refreshes what it caches from the document there, e.g. the node's cap).
        ``retry_now`` retries failed slivers without waiting for their backoff (an operator's
        explicit ``sync --once``)."""
        started = time.monotonic()
        try:
            outcome = self._cycle(allow_mass_delete, wait, before_submit, retry_now)
        except Exception as exc:  # noqa: BLE001 - a failed cycle is an outcome, not a crash
            logger.exception("event=sync-error error=%s", exc)
            outcome = SyncOutcome(ok=False, message=f"sync failed: {type(exc).__name__}: {exc}",
                                  result=SyncResult.ERROR)
        outcome.duration_s = time.monotonic() - started
        self._record_outcome(outcome)
        return outcome

    def _cycle(
        self, allow_mass_delete: bool, wait: bool, before_submit: Callable[[], None] | None, retry_now: bool
    ) -> SyncOutcome:
        operator_allowed = self.store.get_meta(Meta.ALLOW_MASS_DELETE) == "1"
        allow_mass_delete = allow_mass_delete or operator_allowed
        records: dict[str, Sliver] | None = None
        accepted: AuthorityDocument | None = None
        try:
            doc, protected = self._fetch()
        except AuthorityError as exc:
            rejected = isinstance(exc, DocumentRejected)
            result = SyncResult.REJECTED if rejected else SyncResult.UNAVAILABLE
            word = "rejected" if rejected else "unavailable"
            logger.error("event=authority-%s error=%s action=keeping-last-good-state", word, exc)
            outcome = SyncOutcome(ok=False, message=f"authority {word}: {exc}", result=result)
        else:
            for rejection in doc.rejected:
                logger.error("event=entry-rejected entry=%s reason=%s", rejection.label, rejection.reason)
            merged = self.merge(doc, protected, allow_mass_delete=allow_mass_delete)
            outcome = _document_outcome(doc, merged)
            if merged is not None:
                records = self._persist(doc, merged, outcome)
                accepted = doc
                if operator_allowed:
                    self.store.set_meta({Meta.ALLOW_MASS_DELETE: ""})
                    logger.warning("event=mass-delete-allowed-by-operator deletes=%d", len(merged.deletes))
            self.authority_seen = True
        if before_submit is not None:
            before_submit()
        outcome.actions, fresh = self._plan(records, retry_now=retry_now)
        if fresh:
            # Record ownership intent for every new account in one durable transaction
            # before any useradd runs (the per-sliver path would cost one fsync each).
            self.store.mark_owned(sorted(fresh))
        for action in outcome.actions:
            logger.info("sliver=%s event=planned action=%s reason=%s", action.name, action.kind.value, action.reason)
            outcome.completions[action.name] = self.submit(action)
        if accepted is not None:
            self._handle(accepted)
        if wait:
            for completion in outcome.completions.values():
                try:
                    completion.wait()
                except Exception:  # noqa: BLE001 - that sliver's failure, logged and recorded
                    pass  # by the operation (with backoff); or the pool is shutting down
        return outcome

    def _persist(self, doc: AuthorityDocument, merged: MergeResult, outcome: SyncOutcome) -> dict[str, Sliver]:
        meta = {Meta.AUTHORITY_TIMESTAMP: str(doc.timestamp)}
        meta[Meta.BWCAP] = "" if doc.bwcap_kbps is None else str(doc.bwcap_kbps)
        self.store.apply_records(merged.upserts, merged.deletes, meta)
        if merged.valve != self.store.valve():
            self.store.set_valve(merged.valve)
        if merged.valve_tripped:
            logger.critical(
                "event=safety-valve-tripped held_removals=%d names=%s action=not-removing "
                "(confirmed after %d consecutive documents or `nodemanager sync --allow-mass-delete`)",
                len(merged.held), ",".join(sorted(merged.held)[:20]), self.confirm_after,
            )
        for name in merged.stale_kept:
            logger.info("sliver=%s event=kept-newer-record reason=timestamp-rule", name)
        outcome.upserts, outcome.deletes = len(merged.upserts), len(merged.deletes)
        outcome.held, outcome.valve_tripped = merged.held, merged.valve_tripped
        return merged.records

    def _handle(self, doc: AuthorityDocument) -> None:
        """Hand ``doc`` to each node-wide handler; one failing never stops the others."""
        for handler in self.document_handlers:
            try:
                handler.apply(doc)
            except Exception as exc:  # noqa: BLE001 - a handler's failure is its own, not the sync's
                logger.exception("event=document-handler-failed handler=%s error=%s", handler.name, exc)
                self.on_handler_error(handler.name)

    def _record_outcome(self, outcome: SyncOutcome) -> None:
        now = self.clock.now()
        meta = {Meta.LAST_SYNC: f"{now:.0f}", Meta.LAST_OUTCOME: outcome.summary()}
        if outcome.ok:
            meta[Meta.LAST_GOOD] = f"{now:.0f}"
        try:
            self.store.set_meta(meta)
        except NodeManagerError as exc:
            logger.error("event=store-write-failed error=%s", exc)
        log = logger.info if outcome.ok else logger.warning
        log("event=sync-done duration=%.3fs outcome=%r", outcome.duration_s, outcome.summary())


def _document_outcome(doc: AuthorityDocument, merged: MergeResult | None) -> SyncOutcome:
    """The outcome of a cycle that fetched ``doc``: good, merged or (``merged`` None) stale."""
    return SyncOutcome(
        ok=True,
        message="ok" if merged is not None else "stale document ignored",
        document_timestamp=doc.timestamp,
        slivers=len(doc.slivers),
        rejected=len(doc.rejected),
        rejections=doc.rejected,
        result=SyncResult.OK if merged is not None else SyncResult.STALE,
    )
