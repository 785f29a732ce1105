"""The bundled authority's node methods: ``GetSlivers`` and ``GetSliversWait`` (XML-RPC).

``GetSlivers(auth[, node_id])`` answers the GetSlivers struct of the node that the HMAC BootAuth
struct authenticates, with its ``nm_index`` (:mod:`.documents`). ``GetSliversWait(auth, index,
wait)`` is its blocking variant (docs/blocking-queries.md): :func:`wait_request` checks the call
(auth exactly like GetSlivers', over the parameters ``[index, wait]``), and the server either
answers at once or holds the call (:mod:`.server`, :mod:`.waits`). Called through the method
table directly (``dispatch``), GetSliversWait does not hold: it answers at once, the full struct
if the index is stale, else "not modified".

Handlers run on the server's worker threads, never on its event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..authority.auth import verify_hmac_auth
from ..core.errors import PermissionDenied, WrongArgumentCount
from .documents import Snapshot, getslivers_answer
from .issue import TicketContext, get_slice_ticket
from .model import AuthorityData
from .waits import checked_index, clamped_wait

WAIT_METHOD = "GetSliversWait"


class NodeContext(Protocol):
    """What the node methods need of the server (``AuthorityServer`` is one)."""

    def snapshot(self) -> Snapshot: ...

    def data(self) -> AuthorityData: ...


@dataclass(frozen=True, slots=True)
class WaitRequest:
    """A checked GetSliversWait call: node ``node_id`` holds ``index`` and may wait ``wait`` s."""

    node_id: int
    index: str
    wait: int


def get_slivers(server: NodeContext, params: Sequence[Any]) -> Any:
    """GetSlivers(auth[, node_id]): the GetSlivers struct of the authenticated node, with its
    ``nm_index``."""
    if not 1 <= len(params) <= 2:
        raise WrongArgumentCount("GetSlivers takes (auth) or (auth, node_id)")
    snapshot = server.snapshot()
    node_id = verify_hmac_auth(params[0], snapshot.node_keys, params[1:])
    if len(params) == 2 and params[1] not in (node_id, snapshot.data.node(node_id).hostname):
        raise PermissionDenied(f"node {node_id} may only ask for its own slivers")
    return getslivers_answer(snapshot.data, node_id, snapshot.indexes[node_id])


def wait_request(snapshot: Snapshot, params: Sequence[Any]) -> WaitRequest:
    """Check a GetSliversWait call: argument count (Fault 101), auth (108), then the types of
    ``index`` and ``wait`` (102); ``wait`` comes back clamped to 1..600."""
    if len(params) != 3:
        raise WrongArgumentCount("GetSliversWait takes (auth, index, wait)")
    node_id = verify_hmac_auth(params[0], snapshot.node_keys, params[1:])
    return WaitRequest(node_id, checked_index(params[1]), clamped_wait(params[2]))


def not_modified(index: str) -> dict[str, Any]:
    """The answer to a wait that ended without a change."""
    return {"nm_index": index, "nm_not_modified": True}


def get_slivers_wait(server: NodeContext, params: Sequence[Any]) -> Any:
    """GetSliversWait(auth, index, wait): the blocking variant of GetSlivers. Through this table
    it answers without holding (the server's transport does the holding)."""
    snapshot = server.snapshot()
    request = wait_request(snapshot, params)
    current = snapshot.indexes[request.node_id]
    if current != request.index:
        return getslivers_answer(snapshot.data, request.node_id, current)
    return not_modified(request.index)


class MethodContext(NodeContext, TicketContext, Protocol):
    """Everything a default method may need of the server."""


#: A method handler: (the server, the call's parameters) -> the XML-RPC result. Raise a
#: NodeManagerError to answer a Fault with its code. Runs on a worker thread.
MethodHandler = Callable[[Any, Sequence[Any]], Any]

DEFAULT_METHODS: Mapping[str, MethodHandler] = {
    "GetSlivers": get_slivers,
    WAIT_METHOD: get_slivers_wait,
    "GetSliceTicket": get_slice_ticket,
}
