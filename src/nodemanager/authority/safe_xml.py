"""Hardened XML parsing and a safe XML-RPC unmarshaller, for every untrusted XML the node reads.

One parser factory for untrusted XML (dependencies.md): lxml with no DTD loading, no entity
resolution, no network access and libxml2's default depth/size limits; any DOCTYPE is refused (the
entity bombs and external entities all need one); the size cap is checked before parsing. Errors
become :class:`DocumentRejected` at this boundary.

XML-RPC bodies are decoded by the project's one XML-RPC decoder, :mod:`nodemanager.http.xmlrpc`
(defusedxml's hardened expat, streaming: memory follows the result, not the document), under its
``RESPONSE`` and ``CALL`` policies: it accepts what ``xmlrpc.client`` produces and PLCAPI sends:
``int``/``i4``/``i8``, ``boolean``, ``double``, ``string`` (also as bare text), ``nil``,
``base64``, ``dateTime.iso8601``, ``array``, ``struct``. The functions here only add the size
cap's wording and translate its errors into :class:`DocumentRejected` / :class:`AuthorityError`.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

from ..core.errors import AuthorityError, DocumentRejected
from ..http.xmlrpc import CALL, RESPONSE, MalformedXmlRpc, Policy, decode


def _hardened_parser() -> etree.XMLParser:
    # A new parser per call: lxml parsers must not be shared between threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_xml_safely(body: bytes, *, max_bytes: int, what: str) -> Any:
    """Parse untrusted XML into an lxml element, or raise :class:`DocumentRejected`.

    The size cap is checked before any parsing; DTDs are never loaded, entities never resolved,
    and a document that carries a DOCTYPE at all is refused (the classic entity bombs need one)."""
    if not isinstance(body, bytes):
        raise DocumentRejected(f"{what} must be bytes, not {type(body).__name__}")
    if len(body) > max_bytes:
        raise DocumentRejected(f"{what} is {len(body)} bytes, over the {max_bytes}-byte cap")
    if b"<!DOCTYPE" in body[:65536]:
        raise DocumentRejected(f"{what} has a DOCTYPE: DTDs and entities are not accepted")
    try:
        root = etree.fromstring(body, _hardened_parser())
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise DocumentRejected(f"{what} is not well-formed XML: {exc}") from exc
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.doctype:
        raise DocumentRejected(f"{what} has a DOCTYPE: DTDs and entities are not accepted")
    return root


def _decode(body: bytes, *, max_bytes: int, what: str, policy: Policy) -> tuple[str | None, tuple[Any, ...], Any]:
    """Size cap, then the streaming decoder; errors become :class:`DocumentRejected`."""
    if not isinstance(body, bytes):
        raise DocumentRejected(f"{what} must be bytes, not {type(body).__name__}")
    if len(body) > max_bytes:
        raise DocumentRejected(f"{what} is {len(body)} bytes, over the {max_bytes}-byte cap")
    try:
        decoded = decode(body, policy)
    except MalformedXmlRpc as exc:
        raise DocumentRejected(f"malformed {what}: {exc}") from exc
    return decoded.method, decoded.params, decoded.fault


def loads_xmlrpc_response(body: bytes, max_bytes: int) -> Any:
    """The single value of an XML-RPC ``methodResponse``, parsed safely (streaming; see
    :mod:`nodemanager.http.xmlrpc`).

    Raises :class:`DocumentRejected` for an oversized, hostile or malformed body and
    :class:`AuthorityError` carrying the fault string when the authority answered with a Fault."""
    _, params, fault = _decode(body, max_bytes=max_bytes, what="XML-RPC response", policy=RESPONSE)
    if fault is not None:
        code = fault.get("faultCode") if isinstance(fault, dict) else None
        text = fault.get("faultString") if isinstance(fault, dict) else None
        raise AuthorityError(f"the authority answered with fault {code!r}: {str(text)[:500]}")
    if len(params) != 1:
        raise DocumentRejected(f"malformed XML-RPC response: it carries {len(params)} values, not one")
    return params[0]


def loads_xmlrpc_call(body: bytes, max_bytes: int) -> tuple[str, tuple[Any, ...]]:
    """``(method name, params)`` of an XML-RPC ``methodCall``, parsed safely (server side)."""
    method, params, _ = _decode(body, max_bytes=max_bytes, what="XML-RPC request", policy=CALL)
    assert method is not None  # the CALL policy requires one
    return method, params
