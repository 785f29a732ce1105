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
"""

from __future__ import annotations

from dataclasses import dataclass

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
