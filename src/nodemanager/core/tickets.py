"""Ticket rules (tickets.md) as pure decisions: what a verified ticket says, whether this node may
accept it now, and the sliver record it becomes.

Why pure: the checks that decide whether a signed ticket grants anything here -- expiry, clock
skew, node, instantiation, name, caller, replay, staleness -- are the security contract of the
``Ticket`` API method. Kept free of XML, clocks and the store they can be tested exhaustively; the
adapter (``nodemanager.tickets``) verifies the signature, extracts a :class:`TicketData` from the
signed subtree only, reads ``now`` and the store, and asks :func:`check_ticket`.

Every rejection is a ``TicketRejected`` whose message starts with a short reason word (``expired``,
``not yet valid``, ``wrong node``, ``replay``, ``stale``, ``wrong instantiation``, ``invalid slice
name``, ``wrong caller``), so the controller reading Fault 102 knows what to fix.

PLCAPI's OpenPGP tickets (:class:`PlcTicket`, judged by :func:`check_plc_ticket`) name no node, no
expiry of their own and no controller element: their age is bounded by ``tickets.max_age``, each
sliver must name the caller as its controller (its ``delegations``/``controller`` tag, else the
record the node holds), and a ticket granting several slivers is all-or-nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .authz import Caller
from .errors import InvalidName, TicketReason, TicketRejected
from .records import DELEGATED, SOURCE_AUTHORITY, SOURCE_TICKET, Sliver, validate_name


@dataclass(frozen=True, slots=True)
class TicketData:
    """What a ticket's signed ``<ticket>`` element says, syntactically checked but not yet judged.

    ``slice_name`` and ``controller`` are as written (judged by :func:`check_ticket`); ``keys``
    are OpenSSH public key lines; ``attributes`` keep document order, repeats included.
    """

    ticket_id: str
    issued: int
    expires: int
    slice_name: str
    slice_id: int
    instantiation: str
    slice_expires: int
    controller: str
    node_ids: tuple[int, ...]
    keys: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    initscript: str = ""


def check_ticket(
    ticket: TicketData,
    *,
    now: int,
    max_clock_skew: int,
    node_id: int,
    caller: Caller,
    last_issued: int | None,
    existing: Sliver | None,
) -> None:
    """Raise ``TicketRejected`` unless ``ticket`` may be redeemed on node ``node_id`` by ``caller``.

    ``last_issued`` is the slice's replay mark (the ``issued`` of the last accepted ticket, None if
    none); ``existing`` the node's current record of that slice. Rules, in this order:

    * the slice name is a valid sliver name (it becomes an account name and a path);
    * ``issued <= now + max_clock_skew`` and ``now < expires`` (the ticket's own expiry);
    * the slice's instantiation is ``delegated``;
    * ``node_id`` is among the ticket's nodes;
    * the controller is a valid name, and the caller is root or that nm-controller sliver;
    * replay: ``issued`` is newer than ``last_issued``;
    * stale: an authority record of the slice is not newer than ``issued``.
    """
    try:
        validate_name(ticket.slice_name)
    except InvalidName as exc:
        raise TicketRejected(TicketReason.INVALID_NAME, f"{exc}") from None
    name = ticket.slice_name
    if ticket.issued > now + max_clock_skew:
        raise TicketRejected(TicketReason.NOT_YET_VALID, f"ticket for {name} is issued at {ticket.issued}, more than "
            f"{max_clock_skew} s after this node's clock ({now})"
        )
    if now >= ticket.expires:
        raise TicketRejected(TicketReason.EXPIRED, f"ticket for {name} expired at {ticket.expires} (now {now})")
    if now >= ticket.slice_expires:
        raise TicketRejected(TicketReason.EXPIRED, f"slice {name} expired at {ticket.slice_expires} (now {now})")
    if ticket.instantiation != DELEGATED:
        raise TicketRejected(TicketReason.WRONG_INSTANTIATION, f"slice {name} is {ticket.instantiation!r}; tickets grant only "
            f"{DELEGATED!r} slices"
        )
    if node_id not in ticket.node_ids:
        listed = ", ".join(str(n) for n in ticket.node_ids)
        raise TicketRejected(TicketReason.WRONG_NODE, f"ticket for {name} is valid on node(s) {listed}, not on node {node_id}")
    try:
        validate_name(ticket.controller)
    except InvalidName as exc:
        raise TicketRejected(TicketReason.INVALID_CONTROLLER, f"{exc}") from None
    if not caller.is_root and not (caller.is_controller and caller.sliver == ticket.controller):
        raise TicketRejected(TicketReason.WRONG_CALLER, f"ticket for {name} may be delivered by its controller "
            f"{ticket.controller} or root, not by {caller.describe()}"
        )
    if last_issued is not None and ticket.issued <= last_issued:
        raise TicketRejected(TicketReason.REPLAY, f"ticket for {name} issued at {ticket.issued} is not newer than the last "
            f"accepted ticket for that slice (issued at {last_issued})"
        )
    if existing is not None and existing.source == SOURCE_AUTHORITY and existing.timestamp > ticket.issued:
        raise TicketRejected(TicketReason.STALE, f"ticket for {name} issued at {ticket.issued} is older than the authority data "
            f"this node holds for that slice (timestamp {existing.timestamp})"
        )


def ticket_sliver(ticket: TicketData) -> Sliver:
    """The record a redeemed ticket becomes: ticket-sourced, stamped with ``issued`` (the
    timestamp rule then lets a later authority document take over), expiring with the ticket or
    the slice, whichever comes first."""
    return Sliver(
        name=ticket.slice_name,
        slice_id=ticket.slice_id,
        instantiation=DELEGATED,
        expires=min(ticket.expires, ticket.slice_expires),
        timestamp=ticket.issued,
        source=SOURCE_TICKET,
        keys=ticket.keys,
        attributes=ticket.attributes,
        initscript=ticket.initscript,
        controller=ticket.controller,
    )


#: The slice tags that name a delegated slice's controller(s) (PLC's ``delegations`` is a
#: comma-separated list of slice names; ``controller`` is accepted as the same).
CONTROLLER_TAGS = ("delegations", "controller")


@dataclass(frozen=True, slots=True)
class PlcTicket:
    """What a PLCAPI OpenPGP ticket's signed content says, syntactically checked.

    ``slivers`` are the GetSlivers-validated entries (their ``timestamp`` is the ticket's, their
    ``controller`` as the authority parser read it); ``signer`` is the signing key's fingerprint.
    """

    timestamp: int
    slivers: tuple[Sliver, ...]
    signer: str = ""


def named_controllers(sliver: Sliver) -> tuple[str, ...]:
    """Every controller name the sliver's ``delegations``/``controller`` tags give, in order,
    without repeats (not yet validated as names)."""
    names: list[str] = []
    for tag, value in sliver.attributes:
        if tag in CONTROLLER_TAGS:
            for part in value.split(","):
                part = part.strip()
                if part and part not in names:
                    names.append(part)
    return tuple(names)


def check_plc_ticket(
    ticket: PlcTicket,
    *,
    now: int,
    max_age: int,
    max_clock_skew: int,
    caller: Caller,
    last_issued: Callable[[str], int | None],
    existing: Callable[[str], Sliver | None],
) -> tuple[Sliver, ...]:
    """The ticket-sourced records an OpenPGP ticket grants ``caller``, or ``TicketRejected``.

    ``last_issued(name)`` is a slice's replay mark, ``existing(name)`` the node's record of it.
    All-or-nothing: every sliver is judged first and one failing sliver rejects the whole ticket.
    Rules, in this order:

    * the ticket grants at least one sliver and names each at most once;
    * ``timestamp <= now + max_clock_skew`` and ``now - timestamp <= max_age``;
    * per sliver: a valid name, not expired (``now < expires``), ``delegated``;
    * per sliver, the controller: the names of its ``delegations``/``controller`` tags when it has
      any (each a valid name), else the ``controller`` of the record the node holds; the caller
      must be root or an nm-controller sliver so named. The record keeps the caller as its
      controller (root: the first named, or the held record's);
    * per sliver, replay (``timestamp`` newer than the slice's mark) and staleness (no authority
      record newer than ``timestamp``).
    """
    stamp = ticket.timestamp
    if not ticket.slivers:
        raise TicketRejected(TicketReason.MALFORMED, "the ticket grants no sliver")
    names = [s.name for s in ticket.slivers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TicketRejected(TicketReason.MALFORMED, f"the ticket names {repeated[0]} more than once")
    if stamp > now + max_clock_skew:
        raise TicketRejected(TicketReason.NOT_YET_VALID, f"ticket timestamp {stamp} is more than {max_clock_skew} s "
            f"after this node's clock ({now})"
        )
    if now - stamp > max_age:
        raise TicketRejected(TicketReason.TOO_OLD, f"ticket timestamp {stamp} is {now - stamp} s old; "
            f"tickets.max_age is {max_age} s"
        )
    records = []
    for sliver in ticket.slivers:
        records.append(_plc_sliver(sliver, stamp, now=now, caller=caller, last_issued=last_issued(sliver.name),
                                   existing=existing(sliver.name)))
    return tuple(records)


def _plc_sliver(
    sliver: Sliver, stamp: int, *, now: int, caller: Caller, last_issued: int | None, existing: Sliver | None
) -> Sliver:
    try:
        validate_name(sliver.name)
    except InvalidName as exc:
        raise TicketRejected(TicketReason.INVALID_NAME, f"{exc}") from None
    name = sliver.name
    if now >= sliver.expires:
        raise TicketRejected(TicketReason.EXPIRED, f"slice {name} expired at {sliver.expires} (now {now})")
    if sliver.instantiation != DELEGATED:
        raise TicketRejected(TicketReason.WRONG_INSTANTIATION, f"slice {name} is {sliver.instantiation!r}; tickets "
            f"grant only {DELEGATED!r} slices"
        )
    named = named_controllers(sliver)
    for controller in named:
        try:
            validate_name(controller)
        except InvalidName as exc:
            raise TicketRejected(TicketReason.INVALID_CONTROLLER, f"slice {name}: {exc}") from None
    held = existing.controller if existing is not None and existing.controller else ""
    candidates = named or ((held,) if held else ())
    if caller.is_controller and caller.sliver is not None and caller.sliver in candidates:
        controller = caller.sliver
    elif caller.is_root:
        controller = candidates[0] if candidates else ""
    else:
        where = f"its controller(s) {', '.join(candidates)}" if candidates else "no controller"
        source = " (from the ticket)" if named else " (from this node's record)" if held else ""
        raise TicketRejected(TicketReason.WRONG_CALLER, f"slice {name} names {where}{source}: it may be delivered "
            f"by such an nm-controller sliver or root, not by {caller.describe()}"
        )
    if last_issued is not None and stamp <= last_issued:
        raise TicketRejected(TicketReason.REPLAY, f"ticket for {name} with timestamp {stamp} is not newer than the last "
            f"accepted ticket for that slice (issued at {last_issued})"
        )
    if existing is not None and existing.source == SOURCE_AUTHORITY and existing.timestamp > stamp:
        raise TicketRejected(TicketReason.STALE, f"ticket for {name} with timestamp {stamp} is older than the authority "
            f"data this node holds for that slice (timestamp {existing.timestamp})"
        )
    return replace(sliver, instantiation=DELEGATED, timestamp=stamp, source=SOURCE_TICKET, controller=controller)
