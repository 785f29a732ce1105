"""What a worker does for one sliver: ensure, destroy, start, stop — with the store kept truthful.

Each operation writes its intent to the store before touching the machine and its outcome after,
each in one transaction, so a ``kill -9`` at any instant leaves a store from which the next cycle
converges: an account whose creation was interrupted is known to be ours (``owned`` is recorded
before ``useradd``), and an account that exists is never created twice.

Ownership is the safety rule of the whole daemon: only accounts recorded as ``owned`` are ever
modified or removed. An account that exists with a sliver's name but was not made by us is a
conflict, reported with a clear error and retried with backoff, never touched.

Failure isolation: whatever an operation raises -- a ``NodeManagerError``, an illegal phase
transition, a bug's ``KeyError`` -- becomes that sliver's failure (logged with its name, counted,
recorded with a backoff before the next try) and is handed to the job's waiters; it never reaches
another sliver's operation or the sync loop as anything but that sliver's outcome.

Crash recovery: a destroy cut short (phase DESTROYING, the account perhaps half removed) of a
sliver that is wanted again is finished before the account is created afresh, so no sliver stays
in a transitional phase.

These methods run on worker threads (one at a time per sliver, see ``workers``); they are not meant
to be called concurrently for the same sliver.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import replace

from .backends.base import Backend
from .clock import Clock
from .core.errors import AccountConflict, NodeManagerError, NotAllowedForSliver, UnknownSliver
from .core.lifecycle import transition
from .core.records import AccountState, Phase, Sliver
from .core.retry import backoff_delay
from .core.rspec import effective_rspecs, rspec_from_attributes
from .datadir import Meta
from .store import Store

logger = logging.getLogger(__name__)

#: Set (to 1) in the RSpec handed to ``Backend.configure`` while a lease keeps the sliver frozen:
#: the account stays locked for logins, its processes are left alone (not an RSpec resource).
LEASE_FROZEN = "lease_frozen"

#: Retry backoff after a failed operation: 30 s doubling up to an hour (``core.retry``).
BACKOFF_BASE_S = 30.0
BACKOFF_CAP_S = 3600.0


class SliverOperations:
    """The job bodies that ``sync`` and the API hand to the worker pool."""

    def __init__(
        self,
        store: Store,
        backend: Backend,
        clock: Clock,
        *,
        node_cap_kbps: Callable[[], int | None] = lambda: None,
        rng: Callable[[], float] = random.random,
        on_change: Callable[[], None] | None = None,
        on_failure: Callable[[str, BaseException], None] | None = None,
        lease_frozen: Callable[[str], bool] = lambda name: False,
    ) -> None:
        """``on_change()`` is called after an account was made to match or was removed (the
        daemon pokes enforcement); ``on_failure(name, error)`` after an operation failed (the
        daemon counts it). Both must be cheap; an exception they raise is logged, not raised.
        ``lease_frozen(name)``: the lease schedule keeps the sliver frozen now, so configuring
        its account keeps logins locked (``leasing``; the backend reads ``LEASE_FROZEN``)."""
        self.store = store
        self.backend = backend
        self.clock = clock
        self.node_cap_kbps = node_cap_kbps
        self.rng = rng
        self._on_change = on_change
        self._on_failure = on_failure
        self.lease_frozen = lease_frozen

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # noqa: BLE001 - a hook must not fail the operation it reports
                logger.exception("event=on-change-hook-failed")

    def _adopting(self) -> bool:
        """After a corrupt store was set aside, accounts carrying our marker are adopted as ours
        (rebuilding ownership) instead of being reported as conflicts (until a good sync)."""
        return self.store.get_meta(Meta.ADOPT) == "1"

    # --- helpers -------------------------------------------------------------------------
    def effective_rspec(self, name: str, own: Sliver | None = None) -> dict[str, int]:
        """The sliver's RSpec after loans (resources.md).

        Only the slivers that can affect ``name`` are loaded: a loan's effect depends on its
        lender's own RSpec and earlier loans and on whether the recipient exists, so ``name``,
        its lenders and the recipients of their loans are enough. With no loans involved this is
        one record lookup, which keeps a full sync of thousands of slivers linear.
        """
        cap = self.node_cap_kbps()
        own = own or self.store.sliver(name)
        if own is None:
            raise UnknownSliver(f"no sliver named {name!r} on this node")
        loans = self.store.loans()
        if not loans:
            return rspec_from_attributes(own.attributes, cap)
        lenders = {name} | {lender for lender, given in loans.items() if any(l.recipient == name for l in given)}
        involved = set(lenders)
        for lender in lenders:
            involved.update(l.recipient for l in loans.get(lender, ()))
        rspecs: dict[str, dict[str, int]] = {}
        for other in involved:
            record = own if other == name else self.store.sliver(other)
            if record is not None:
                rspecs[other] = rspec_from_attributes(record.attributes, cap)
        relevant = {lender: loans[lender] for lender in lenders if lender in loans}
        return effective_rspecs(rspecs, relevant)[name]

    def _state(self, name: str) -> AccountState:
        return self.store.account(name) or AccountState(name=name)

    def _fail(self, name: str, exc: BaseException) -> None:
        state = self._state(name)
        # A failed destroy stays a destroy in progress (its account may be half removed: locked,
        # stopped, its leftovers gone): the plan finishes it, or finishes it and creates the
        # sliver afresh if it is wanted again. Any other failure is FAILED.
        phase = Phase.DESTROYING if state.phase is Phase.DESTROYING else Phase.FAILED
        transition(state.phase, phase)  # recorded like every change
        failures = state.failures + 1
        retry_at = self.clock.now() + backoff_delay(failures, BACKOFF_BASE_S, BACKOFF_CAP_S, self.rng)
        message = str(exc) if isinstance(exc, NodeManagerError) else f"internal error: {type(exc).__name__}: {exc}"
        self.store.record_failure(name, message, retry_at, phase)
        logger.error(
            "sliver=%s event=failed failures=%d retry_in=%.0fs error=%s",
            name, failures, retry_at - self.clock.now(), message,
        )
        if self._on_failure is not None:
            try:
                self._on_failure(name, exc)
            except Exception:  # noqa: BLE001
                logger.exception("sliver=%s event=on-failure-hook-failed", name)

    def _guarded(self, name: str, body: Callable[[], None]) -> None:
        """Run ``body``; any ``Exception`` is this sliver's failure (recorded, then re-raised to
        the job's waiters). Exceptions that are not ``Exception`` (a simulated crash,
        ``KeyboardInterrupt``) pass untouched."""
        try:
            body()
        except NodeManagerError as exc:
            self._fail(name, exc)
            raise
        except Exception as exc:  # a bug or an untranslated OS error: still one sliver only
            logger.exception("sliver=%s event=internal-error", name)
            self._fail(name, exc)
            raise

    # --- operations ----------------------------------------------------------------------
    def ensure(self, sliver: Sliver, start: bool = False) -> None:
        """Create the account if needed and make it match ``sliver``; optionally start it."""
        self._guarded(sliver.name, lambda: self._ensure(sliver, start))

    def _ensure(self, sliver: Sliver, start: bool) -> None:
        name = sliver.name
        state = self._state(name)
        if state.owned and state.phase is Phase.DESTROYING:
            state = self._finish_interrupted_destroy(name, state)
        existing = self.backend.lookup(name)
        if not state.owned and existing is not None:
            if not (existing.managed_marker and self._adopting()):
                raise AccountConflict(
                    f"sliver {name}: an account of that name already exists and was not created "
                    "by the node manager; it is left untouched"
                )
            state = replace(state, owned=True, uid=existing.uid)
            logger.warning("sliver=%s event=adopted uid=%d reason=store-rebuilt", name, existing.uid)
        elif not state.owned:
            # Intent first, durably: if we die after useradd, the next cycle knows it is ours.
            self.store.mark_owned([name])
            state = replace(state, owned=True, uid=None, phase=transition(state.phase, Phase.ABSENT))
        if existing is None:
            recreated = state.uid is not None
            if recreated:
                # Forget the vanished account's uid before useradd: killed between useradd and
                # the write below, the next cycle adopts the new account instead of taking it
                # for one replaced by someone else.
                state = replace(state, uid=None, phase=transition(state.phase, Phase.ABSENT))
                self.store.put_account(state)
            try:
                uid = self.backend.create(sliver)
            except AccountConflict:
                if not recreated:  # the name was never ours: give it back
                    self.store.put_account(replace(state, owned=False))
                raise
            state = replace(state, uid=uid, phase=transition(state.phase, Phase.STOPPED))
            if recreated:
                logger.warning("sliver=%s event=recreated uid=%d reason=account-disappeared", name, uid)
            else:
                logger.info("sliver=%s event=created uid=%d", name, uid)
        elif state.uid is None:
            state = replace(state, uid=existing.uid)
        elif existing.uid != state.uid:
            raise AccountConflict(
                f"sliver {name}: account uid changed from {state.uid} to {existing.uid}; "
                "it was replaced outside the node manager and is left untouched"
            )
        rspec = self.effective_rspec(name, sliver)
        frozen = self.lease_frozen(name)
        if frozen:
            rspec = {**rspec, LEASE_FROZEN: 1}
        access = self.backend.configure(sliver, rspec)
        phase = state.phase
        pending = state.start_pending
        if phase not in (Phase.RUNNING, Phase.STOPPED):  # after a failure or a crash: ask
            phase = Phase.RUNNING if self.backend.is_running(name) else Phase.STOPPED
        if rspec.get("nm_enabled", 1) == 0:
            # configure stopped it, as a Stop would: a start deferred earlier is dropped too
            phase, pending = Phase.STOPPED, False
        elif start and state.phase is Phase.RUNNING:
            # The plan asked for a start on the state it read; an operation that ran meanwhile
            # (a create still in flight when the plan was made) has started it: starting again
            # would run its initscript twice.
            pending = False
            logger.info("sliver=%s event=start-skipped reason=already-running", name)
        elif start and frozen:
            phase, pending = self._defer_start(name)
        elif start:
            self.backend.start(sliver)
            phase, pending = Phase.RUNNING, False
            logger.info("sliver=%s event=started", name)
        self.store.put_account(
            replace(state, applied=sliver.fingerprint(), phase=transition(state.phase, phase), failures=0,
                    last_error="", retry_at=0.0, access=access or "", start_pending=pending)
        )
        logger.info("sliver=%s event=configured", name)
        self._changed()

    def _finish_interrupted_destroy(self, name: str, state: AccountState) -> AccountState:
        """A destroy was cut short (the daemon died between marking it and forgetting it) and
        the sliver is wanted again: finish the destroy -- its account may be half removed -- so
        the account is then created afresh, never left in DESTROYING."""
        logger.warning("sliver=%s event=finishing-interrupted-destroy", name)
        self.backend.destroy(name)
        state = replace(state, uid=None, applied="", access="", start_pending=False,
                        phase=transition(state.phase, Phase.ABSENT))
        self.store.put_account(state)
        self._changed()
        return state

    def destroy(self, name: str) -> None:
        """Stop and remove the sliver's account if we own it; then forget the sliver."""
        self._guarded(name, lambda: self._destroy(name))

    def _destroy(self, name: str) -> None:
        state = self.store.account(name)
        if state is not None and state.owned:
            self.store.put_account(replace(state, phase=transition(state.phase, Phase.DESTROYING), start_pending=False))
            self.backend.destroy(name)
            logger.info("sliver=%s event=destroyed", name)
        self.store.finish_destroy(name)
        self._changed()

    def report_conflict(self, name: str, reason: str) -> None:
        """Record that the sliver's account is in a state we must not touch (with backoff)."""

        def body() -> None:
            raise AccountConflict(f"sliver {name}: {reason}; it is left untouched")

        self._guarded(name, body)

    def start(self, name: str) -> None:
        self._guarded(name, lambda: self._start_or_stop(name, True))

    def start_deferred(self, name: str) -> None:
        """Do the start deferred while a lease froze the sliver (``start_pending``), now that it
        is thawed: ``ensure`` with its stored record and ``start``. Nothing when no start is
        pending any more (a Stop, Destroy or start ran since the job was queued) or the
        schedule froze it again (it stays pending)."""
        state = self.store.account(name)
        sliver = self.store.sliver(name)
        if state is None or not state.start_pending or sliver is None:
            return
        if self.lease_frozen(name):
            logger.info("sliver=%s event=start-still-deferred reason=lease", name)
            return
        self.ensure(sliver, start=True)

    def stop(self, name: str) -> None:
        self._guarded(name, lambda: self._start_or_stop(name, False))

    def _start_or_stop(self, name: str, run: bool) -> None:
        sliver = self.store.sliver(name)
        state = self.store.account(name)
        if sliver is None:
            raise UnknownSliver(f"no sliver named {name!r} on this node")
        if state is None or not state.owned or state.uid is None:
            raise AccountConflict(f"sliver {name}: its account has not been created yet")
        if run:
            if self.effective_rspec(name).get("nm_enabled", 1) == 0:
                raise NotAllowedForSliver(f"sliver {name} is disabled (nm_enabled = 0)")
            if self.lease_frozen(name):
                phase, pending = self._defer_start(name)
                self.store.put_account(replace(state, phase=transition(state.phase, phase), start_pending=pending))
                return
            self.backend.start(sliver)
        else:
            self.backend.stop(name)
        new_phase = Phase.RUNNING if run else Phase.STOPPED
        # a start done, or a Stop, ends any start deferred by a lease
        self.store.put_account(replace(state, phase=transition(state.phase, new_phase), start_pending=False))
        logger.info("sliver=%s event=%s", name, "started" if run else "stopped")

    def _defer_start(self, name: str) -> tuple[Phase, bool]:
        """A start asked for while a lease keeps the sliver frozen is not done: its account is
        locked (the backend would skip it) and a process started into its frozen cgroup would
        freeze inside the spawn, holding this worker and the fork guard. It is recorded instead
        (phase STOPPED, ``start_pending``) and done when the sliver is thawed: at once through
        the scheduler's ``on_thawed`` (``start_deferred``), or by the plan's "deferred start"."""
        logger.info("sliver=%s event=start-deferred reason=lease", name)
        return Phase.STOPPED, True

