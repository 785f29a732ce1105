"""The twelve API methods (api.md), behind one dispatcher that checks and authorizes every call.

The transport hands each request to :meth:`NodeManagerApi.dispatch` with the caller's
``PeerIdentity`` from the kernel. Every call goes through the same steps, in this order, so no
method can forget one:

1. the method exists (``UnknownMethod``, 100, listing the valid ones);
2. the argument count matches :data:`core.authz.METHODS` (``WrongArgumentCount``, 101);
3. a sliver argument is a valid name (``InvalidName``, 102) of a sliver on this node
   (``UnknownSliver``, 102) -- checked before authorization, as the original did;
4. ``core.authz.decide`` allows the caller (``PermissionDenied``, 108, with the reason);
5. Create and Destroy refuse non-delegated slivers (``NotAllowedForSliver``, 104);
6. the method body runs.

The API never calls a backend: Create, Destroy, Start and Stop enqueue work on the per-sliver
workers, so an API call and the sync loop can never run two operations on one sliver at once.
They do not wait for it either: :meth:`NodeManagerApi.dispatch_deferred` answers them with a
:class:`~.deferred.Pending` that the server awaits in its event loop (up to ``operation_timeout``)
without holding a dispatch thread; :meth:`NodeManagerApi.dispatch` waits in the calling thread.
Start and Stop of one sliver coalesce on the workers (a pending one is replaced by the latest,
whose outcome every replaced caller receives), so alternating calls cost one operation, not a
backlog. Every result is XML-RPC-safe: no None, string keys, integers within 32 bits.

The method docstrings' first lines are the ``Help()`` text (:func:`help_text`).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Protocol

from ..core.authz import METHODS, Caller, decide
from ..core.errors import (
    InvalidArgument,
    InvalidLoans,
    NodeManagerError,
    NotAllowedForSliver,
    PermissionDenied,
    UnknownMethod,
    UnknownSliver,
    WrongArgumentCount,
)
from ..core.records import DELEGATED, NM_CONTROLLER, AccountState, Sliver, validate_name
from ..core.rspec import MAX_VALUE, rspec_from_attributes, validate_loans
from ..operations import SliverOperations
from ..store import Store
from ..workers import WorkerPool
from .deferred import Pending, resolve
from .identity import PeerIdentity

logger = logging.getLogger(__name__)

#: Largest integer an XML-RPC ``<int>`` carries (32-bit signed).
XMLRPC_MAX_INT = 2**31 - 1
#: Job kinds that replace each other while pending: the latest wanted run state wins.
RUN_STATE_KINDS = frozenset({"start", "stop"})


class TicketRedeemer(Protocol):
    """The ticket port (tickets.md): verify a signed ticket and create or update its sliver."""

    def redeem(self, ticket: str, caller: Caller) -> str:
        """Verify ``ticket`` for ``caller`` and store the delegated sliver it grants; return the
        sliver's name. Raises ``TicketRejected`` (with the reason) when any check fails, and then
        nothing changes. Called from the API's request threads, possibly concurrently."""
        ...


def caller_resolver(
    store: Store, getpwuid: Callable[[int], object | None], observers: Iterable[str] = ()
) -> Callable[[PeerIdentity], Caller]:
    """Build the function that turns a kernel-established peer into a :class:`Caller`.

    uid 0 is root; ``sliver`` is the name whose account state is owned with that uid;
    ``is_controller`` comes from that sliver's record; ``local_account`` is whether ``getpwuid``
    (the password database lookup, None for an unknown uid) knows the uid. ``is_observer``: the
    sliver's record is an observer's (``Sliver.is_observer``: ``nm_observer = 1`` from the
    authority), or the entry's account ``name`` is one of ``observers`` (``api.observers``). The
    uid -> sliver map is cached and each hit re-checked against the store (one lookup), so a call
    costs no scan of all accounts unless the uid is not a sliver's; the record and the password
    entry are read afresh on every call, so a changed tag or a renamed account counts at once.
    Thread-safe.
    """
    observer_names = frozenset(observers)
    lock = threading.Lock()
    by_uid: dict[int, str] = {}

    def sliver_of(uid: int) -> str | None:
        with lock:
            name = by_uid.get(uid)
        if name is not None:
            state = store.account(name)
            if state is not None and state.owned and state.uid == uid:
                return name
        found = sorted(n for n, s in store.accounts().items() if s.owned and s.uid == uid)
        with lock:
            if found:
                by_uid[uid] = found[0]
            else:
                by_uid.pop(uid, None)
        return found[0] if found else None

    def resolve(peer: PeerIdentity) -> Caller:
        uid = peer.uid
        if uid is None:
            return Caller(uid=None, is_root=False, local_account=False, sliver=None, is_controller=False)
        if uid == 0:
            return Caller(uid=0, is_root=True, local_account=True, sliver=None, is_controller=False)
        sliver = sliver_of(uid)
        record = store.sliver(sliver) if sliver is not None else None
        entry = getpwuid(uid)
        named = entry is not None and bool(observer_names) and getattr(entry, "name", None) in observer_names
        return Caller(
            uid=uid,
            is_root=False,
            local_account=entry is not None,
            sliver=sliver,
            is_controller=record is not None and record.instantiation == NM_CONTROLLER,
            is_observer=named or (record is not None and record.is_observer),
        )

    return resolve


def _xmlrpc_int(value: int) -> int:
    """Clamp into the XML-RPC ``<int>`` range (a received-loans sum can exceed it)."""
    return max(-XMLRPC_MAX_INT - 1, min(XMLRPC_MAX_INT, value))


class NodeManagerApi:
    """The API methods. Call :meth:`dispatch`; the public ``CamelCase`` methods are the bodies,
    run after checks and authorization, with the resolved caller first and, for sliver methods,
    the sliver's record in place of its name.

    Threads: ``dispatch`` and ``dispatch_deferred`` are called from the server's request
    threads, concurrently; ``dispatch`` blocks while an operation runs on the workers,
    ``dispatch_deferred`` never does (it answers a Pending instead).
    """

    def __init__(
        self,
        *,
        store: Store,
        pool: WorkerPool,
        operations: SliverOperations,
        resolve_caller: Callable[[PeerIdentity], Caller],
        node_cap_kbps: Callable[[], int | None] = lambda: None,
        tickets: TicketRedeemer | None = None,
        on_loans_changed: Callable[[], None] = lambda: None,
        operation_timeout: float = 120.0,
    ) -> None:
        self.store = store
        self.pool = pool
        self.operations = operations
        self.resolve_caller = resolve_caller
        self.node_cap_kbps = node_cap_kbps
        self.tickets = tickets
        self.on_loans_changed = on_loans_changed
        self.operation_timeout = operation_timeout

    # --- the dispatcher contract with the transport ----------------------------------------------
    def dispatch(self, method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
        """Run ``method`` with ``params`` for ``peer``; return the result or raise a
        ``core.errors`` exception (the transport turns it into a Fault). An operation is waited
        for in this thread, up to ``operation_timeout``."""
        return resolve(self.dispatch_deferred(method, params, peer))

    def dispatch_deferred(self, method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
        """As :meth:`dispatch`, except that Create, Destroy, Start and Stop answer a
        :class:`~.deferred.Pending` once their operation is queued (the checks are done; the
        Pending carries the outcome). What the daemon's ``ApiServer`` calls."""
        spec = METHODS.get(method) if isinstance(method, str) else None
        if spec is None:
            shown = method[:64] if isinstance(method, str) else type(method).__name__
            raise UnknownMethod(f"unknown method {shown!r}; valid methods: {', '.join(METHODS)}")
        if len(params) != len(spec.args):
            raise WrongArgumentCount(
                f"{method}({', '.join(spec.args)}) takes {len(spec.args)} argument"
                f"{'' if len(spec.args) == 1 else 's'}, {len(params)} given"
            )
        target: Sliver | None = None
        args: tuple[Any, ...] = tuple(params)
        if spec.takes_sliver:
            target = self._record(params[0])
            args = (target, *params[1:])
        caller = self.resolve_caller(peer)
        decision = decide(caller, method, target)
        if not decision.allowed:
            logger.warning(
                "event=permission-denied method=%s sliver=%s uid=%s reason=%s",
                method, target.name if target else "-", caller.uid, decision.reason,
            )
            raise PermissionDenied(f"permission denied: {decision.reason}")
        if spec.delegated_only and target is not None and target.instantiation != DELEGATED:
            raise NotAllowedForSliver(
                f"{method}({target.name}): only the authority creates non-delegated slivers "
                f"({target.name} is {target.instantiation})"
            )
        return getattr(self, method)(caller, *args)

    def _record(self, raw: object) -> Sliver:
        name = validate_name(raw)
        record = self.store.sliver(name)
        if record is None:
            raise UnknownSliver(f"no sliver named {name!r} on this node")
        return record

    def _pending(self, what: str, name: str, kind: str, run: Callable[[], Any],
                 finish: Callable[[Any], Any], *, replaces: frozenset[str] = frozenset()) -> Pending:
        """Queue ``run`` on sliver ``name``'s worker; the Pending answering the call."""
        completion = self.pool.submit(name, kind, run, replaces=replaces)
        return Pending(completion, what, self.operation_timeout, finish)

    # --- the methods (first docstring line = Help text) ----------------------------------------
    def Help(self, caller: Caller) -> str:  # noqa: N802 - XML-RPC method names are CamelCase
        """Return this list of methods, one line each: Name(args): description."""
        return help_text()

    def GetXIDs(self, caller: Caller) -> dict[str, int]:  # noqa: N802
        """Return a struct mapping each sliver that has an account to its uid (xid)."""
        result: dict[str, int] = {}
        for name, state in sorted(self.store.accounts().items()):
            if state.owned and state.uid is not None:
                if 0 <= state.uid <= XMLRPC_MAX_INT:
                    result[name] = state.uid
                else:
                    logger.warning(
                        "sliver=%s event=xid-not-reported uid=%d reason=beyond-32-bit", name, state.uid
                    )
        return result

    def GetSSHKeys(self, caller: Caller) -> dict[str, str]:  # noqa: N802
        """Return a struct mapping each sliver to its SSH keys, one key per line."""
        return {name: "\n".join(record.keys) for name, record in sorted(self.store.slivers().items())}

    def Ticket(self, caller: Caller, ticket: Any) -> int:  # noqa: N802
        """Redeem a signed ticket that creates or updates a delegated sliver; returns 1."""
        if self.tickets is None:
            raise InvalidArgument("tickets not configured")
        if not isinstance(ticket, str):
            raise InvalidArgument(f"ticket must be a string, not {type(ticket).__name__}")
        name = self.tickets.redeem(ticket, caller)
        logger.info("sliver=%s event=ticket-redeemed uid=%s", name, caller.uid)
        return 1

    def Create(self, caller: Caller, sliver: Sliver) -> Pending:  # noqa: N802
        """Create the account of a delegated sliver (left stopped); returns 1 when done."""
        name = sliver.name

        def job() -> None:
            # Recorded on the sliver's worker, not on the request thread: an operation in flight
            # for this sliver could otherwise write its older copy of the state over the flag (or
            # the flag's write could undo that operation's outcome).
            current = self.store.sliver(name)
            if current is None:  # forgotten while the job waited its turn
                raise UnknownSliver(f"no sliver named {name!r} on this node")
            self._request_create(name)
            self.operations.ensure(current, start=False)

        def created(_result: Any) -> int:
            logger.info("sliver=%s event=api-create uid=%s", name, caller.uid)
            return 1

        return self._pending(f"Create({name})", name, "create", job, created)

    def _request_create(self, name: str) -> None:
        """Remember that the account was asked for: the plan keeps a delegated sliver's account
        only while this flag is set (other fields of the state are kept)."""
        state = self.store.account(name) or AccountState(name=name)
        if not state.create_requested:
            self.store.put_account(replace(state, create_requested=True))

    def Destroy(self, caller: Caller, sliver: Sliver) -> Pending:  # noqa: N802
        """Remove a delegated sliver's account and forget the sliver; returns 1 when done."""
        name = sliver.name
        loans = self.store.loans()
        involved = name in loans or any(l.recipient == name for given in loans.values() for l in given)

        def destroyed(_result: Any) -> int:
            logger.info("sliver=%s event=api-destroy uid=%s", name, caller.uid)
            if involved:  # the loans it gave or received no longer take effect
                self._loans_changed(name)
            return 1

        return self._pending(f"Destroy({name})", name, "destroy", lambda: self.operations.destroy(name), destroyed)

    def Start(self, caller: Caller, sliver: Sliver) -> Pending:  # noqa: N802
        """Run the sliver's start scripts (its account must exist); returns 1 when done."""
        name = sliver.name
        return self._pending(f"Start({name})", name, "start", lambda: self.operations.start(name), _one,
                             replaces=RUN_STATE_KINDS)

    def Stop(self, caller: Caller, sliver: Sliver) -> Pending:  # noqa: N802
        """End every process of the sliver; returns 1 when done."""
        name = sliver.name
        return self._pending(f"Stop({name})", name, "stop", lambda: self.operations.stop(name), _one,
                             replaces=RUN_STATE_KINDS)

    def GetRSpec(self, caller: Caller, sliver: Sliver) -> dict[str, int]:  # noqa: N802
        """Return the sliver's resources as its authority or ticket set them (name -> int)."""
        rspec = rspec_from_attributes(sliver.attributes, self.node_cap_kbps())
        return {resource: _xmlrpc_int(value) for resource, value in rspec.items()}

    def GetEffectiveRSpec(self, caller: Caller, sliver: Sliver) -> dict[str, int]:  # noqa: N802
        """Return the sliver's resources after the loans it gives and receives (name -> int)."""
        rspec = self.operations.effective_rspec(sliver.name)
        return {resource: _xmlrpc_int(value) for resource, value in rspec.items()}

    def GetLoans(self, caller: Caller, sliver: Sliver) -> list[list[Any]]:  # noqa: N802
        """Return the sliver's loans as an array of [recipient, resource, amount]."""
        return [[l.recipient, l.resource, l.amount] for l in self.store.loans().get(sliver.name, ())]

    def SetLoans(self, caller: Caller, sliver: Sliver, loans: Any) -> int:  # noqa: N802
        """Replace the sliver's loans with [[recipient, resource, amount], ...]; returns 1."""
        checked = validate_loans(loans)
        for index, loan in enumerate(checked):
            if loan.amount > MAX_VALUE:
                raise InvalidLoans(f"loan {index}: amount must be at most {MAX_VALUE}")
        self.store.set_loans(sliver.name, checked)
        logger.info("sliver=%s event=loans-set count=%d uid=%s", sliver.name, len(checked), caller.uid)
        self._loans_changed(sliver.name)
        return 1

    def _loans_changed(self, name: str) -> None:
        """Tell the daemon to re-apply enforcement. The change is already stored, so a failing
        hook does not fail the call: it is logged and the next cycle applies the change."""
        try:
            self.on_loans_changed()
        except Exception:
            logger.exception("sliver=%s event=loans-hook-failed", name)


def _one(_result: Any) -> int:
    """The answer of an operation that succeeded: 1, as the original answered."""
    return 1


def help_text() -> str:
    """``Help()``'s answer: ``Name(args): description`` per method, in :data:`METHODS` order,
    the description being the first line of the method's docstring."""
    return _HELP_TEXT


def _build_help() -> str:
    lines = []
    for name, spec in METHODS.items():
        doc = inspect.getdoc(getattr(NodeManagerApi, name)) or ""
        lines.append(f"{name}({', '.join(spec.args)}): {doc.splitlines()[0] if doc else ''}")
    return "\n".join(lines)


_HELP_TEXT = _build_help()
