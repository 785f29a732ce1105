"""The node API's view of the wire: XML-RPC request bodies in, response bodies out, and the one
HTTP rule set it serves (a POST of at most ``api.max_request_bytes``).

The work is done by the project's shared stack -- HTTP framing in :mod:`nodemanager.http.framing`,
the hardened XML-RPC decoder in :mod:`nodemanager.http.xmlrpc` (policy ``API_CALL``: a
``methodCall``, no ``<nil/>``, no DTD or entity, bounded nesting) -- and this module only states
the API's contract on top:

Contract of :func:`parse_request`: every problem with a body -- not XML, not UTF-8 (nor another
encoding the XML declaration names and expat knows), a DTD or entity, not a ``methodCall``, a bad
value or method name -- raises :class:`InvalidArgument` whose message starts with ``malformed
XML-RPC request:``, which the server answers with Fault 102 on a connection that stays usable.
Values decode to ``bool``, ``int``, ``float``, ``str``, ``bytes`` (base64), ``datetime``
(dateTime.iso8601), ``list`` and ``dict`` with ``str`` keys.

The size cap is checked on the head (:func:`parse_head`): a body over ``api.max_request_bytes``
is never read.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import InvalidArgument
from ..http.framing import MAX_HEAD_BYTES, HttpError, Request, error_response, parse_request_head
from ..http.xmlrpc import API_CALL, MAX_CONTAINER_DEPTH, MalformedXmlRpc, decode, dump_fault, dump_response

__all__ = [
    "MAX_DEPTH", "MAX_HEAD_BYTES", "HttpError", "RequestHead", "dump_fault", "dump_response",
    "error_response", "parse_head", "parse_request",
]

#: Deepest nesting of arrays and structs accepted in a request.
MAX_DEPTH = MAX_CONTAINER_DEPTH
#: A checked request head (kept under its historical name).
RequestHead = Request


def parse_request(body: bytes) -> tuple[str, tuple[Any, ...]]:
    """``(method name, params)`` of an XML-RPC ``methodCall`` body.

    Raises :class:`InvalidArgument` ("malformed XML-RPC request: <why>") for anything wrong.
    Pure CPU work; safe to call from any thread.
    """
    try:
        decoded = decode(body, API_CALL)
    except MalformedXmlRpc as exc:
        raise InvalidArgument(f"malformed XML-RPC request: {str(exc)[:200]}") from exc
    assert decoded.method is not None  # API_CALL requires one
    return decoded.method, decoded.params


def parse_head(head: bytes, max_body: int) -> Request:
    """Check the head of an XML-RPC POST (:func:`~nodemanager.http.framing.parse_request_head`
    with the API's one method); :class:`HttpError` for anything the server must refuse."""
    return parse_request_head(head, max_body=max_body, methods=("POST",))
