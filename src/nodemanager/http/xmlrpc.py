"""The project's one XML-RPC codec: a hardened streaming decoder with a policy, and the encoders.

Every XML-RPC body the project reads goes through :func:`decode`: requests to the node API
(:mod:`nodemanager.api.wire`, policy :data:`API_CALL`), answers of the authority to the node and
requests to the bundled authority (:mod:`nodemanager.authority.safe_xml`, policies
:data:`RESPONSE` and :data:`CALL`).

Why not ``xmlrpc.client.loads``: the stdlib expat parser expands internal entities (a
billion-laughs body burns 90-150 ms of CPU per request) and silently replaces external entities
with "", and the stdlib ``Unmarshaller`` accepts bogus XML-RPC (unknown elements are ignored,
``<nil/>`` and ``<bigdecimal>`` always decode). Why not an lxml tree: a 10,000-sliver GetSlivers
answer is ~20 MB and its tree costs ~300 MB before the first value is read. Here defusedxml's
expat parser runs with every DTD refused (so no entity can be declared at all) and reports
elements as they stream past; each value is built once (memory follows the result, not the
document, and decoding is ~20 % faster than the stdlib's), and the structure is checked as it
streams: every element must appear under its legal parent (a table), unknown value types are
refused, a document must end complete. Nothing is monkey-patched.

What a :class:`Policy` decides: the root element (``methodCall`` or ``methodResponse``),
whether ``<nil/>`` is accepted (in responses only: PLCAPI sends it; the node API takes none), the
deepest nesting of arrays and structs, and the size cap (checked before parsing). Values decode
to ``bool``, ``int`` (within 64 bits), ``float``, ``str``, ``bytes`` (base64, strictly: only the
alphabet and white space), ``datetime`` (dateTime.iso8601), ``list``, ``dict`` with ``str`` keys,
and ``None`` where the policy allows it. A method name must look like one
(``[A-Za-z_][A-Za-z0-9_.:]*``, at most 128 characters). Every problem raises
:class:`MalformedXmlRpc` whose message says why.
"""

from __future__ import annotations

import binascii
import re
import xmlrpc.client
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from xml.parsers.expat import ExpatError

from defusedxml import DefusedXmlException
from defusedxml.xmlrpc import DefusedExpatParser

__all__ = [
    "API_CALL", "CALL", "MAX_CONTAINER_DEPTH", "RESPONSE", "Decoded", "MalformedXmlRpc", "Policy", "decode",
    "dump_call", "dump_fault", "dump_response",
]

#: Deepest nesting of structs and arrays accepted by default. GetSlivers needs 3, the API's
#: methods 2; this only refuses absurd documents (whose values later recursion would choke on).
MAX_CONTAINER_DEPTH = 32
_MAX_METHOD_NAME = 128
_METHOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:]*", re.ASCII)
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class MalformedXmlRpc(ValueError):
    """The body is not a well-formed, acceptable XML-RPC document (the message says why)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """What one reader of XML-RPC accepts (see the module doc)."""

    root: str
    allow_nil: bool
    max_depth: int = MAX_CONTAINER_DEPTH
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.root not in ("methodCall", "methodResponse"):
            raise ValueError(f"XML-RPC root must be methodCall or methodResponse, not {self.root!r}")


#: Requests to the node API: no nil (api.md "Transports").
API_CALL = Policy(root="methodCall", allow_nil=False)
#: Requests to the bundled authority (the node's client sends nil in optional arguments).
CALL = Policy(root="methodCall", allow_nil=True)
#: Answers of an authority (PLCAPI sends nil for absent values).
RESPONSE = Policy(root="methodResponse", allow_nil=True)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded document: the method name (calls), the params, the fault value (responses)."""

    method: str | None
    params: tuple[Any, ...]
    fault: Any = None


def _boolean(text: str) -> bool:
    text = text.strip()
    if text == "1":
        return True
    if text == "0":
        return False
    raise MalformedXmlRpc(f"boolean must be 0 or 1, not {text[:20]!r}")


def _integer(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise MalformedXmlRpc("integer out of the 64-bit range")
    return value


def _base64(text: str) -> bytes:
    # Encoders insert line breaks; anything else outside the alphabet is refused (the stdlib
    # silently skips it).
    return binascii.a2b_base64("".join(text.split()), strict_mode=True)


def _date(text: str) -> datetime:
    return datetime.strptime(text.strip(), "%Y%m%dT%H:%M:%S")


#: Scalar element -> converter of its text.
_SCALARS: dict[str, Any] = {
    "string": str,
    "int": _integer, "i4": _integer, "i8": _integer, "i1": _integer, "i2": _integer, "biginteger": _integer,
    "boolean": _boolean,
    "double": float, "float": float,
    "base64": _base64,
    "dateTime.iso8601": _date,
}

#: Element -> the parents it may appear under (None: the document root).
_PARENTS: dict[str, tuple[str | None, ...]] = {
    "methodResponse": (None,),
    "methodCall": (None,),
    "methodName": ("methodCall",),
    "params": ("methodResponse", "methodCall"),
    "param": ("params",),
    "fault": ("methodResponse",),
    "value": ("param", "data", "member", "fault"),
    "struct": ("value",),
    "array": ("value",),
    "data": ("array",),
    "member": ("struct",),
    "name": ("member",),
    "nil": ("value",),
    **{scalar: ("value",) for scalar in _SCALARS},
}

_UNSET = object()


class _Target:
    """The expat target: closures over local lists (attribute lookups on ``self`` cost a third
    of the decoding time for a large document)."""

    def __init__(self, policy: Policy) -> None:
        tags: list[str] = []
        text: list[str] = []
        values: list[Any] = []         # one slot per open <value>
        containers: list[Any] = []     # open dicts and lists
        members: list[list[Any]] = []  # [name, value] of open <member>s
        params: list[Any] = []
        found: dict[str, Any] = {}     # root, method, fault
        parents, scalars = _PARENTS, _SCALARS
        unset = _UNSET
        root, allow_nil, max_depth = policy.root, policy.allow_nil, policy.max_depth

        def start(tag: str, attrs: Any) -> None:
            allowed = parents.get(tag)
            parent = tags[-1] if tags else None
            if allowed is None or parent not in allowed:
                where = f"inside <{parent}>" if parent else "as the root"
                raise MalformedXmlRpc(f"<{tag[:40]}> is not allowed {where}")
            tags.append(tag)
            text.clear()
            if tag == "value":
                values.append(unset)
            elif tag == "member":
                members.append([unset, unset])
            elif tag == "struct" or tag == "array":
                # Only containers nest without bound; each costs 3-4 elements of depth.
                if len(containers) >= max_depth:
                    raise MalformedXmlRpc(f"values nested deeper than {max_depth} levels")
                containers.append({} if tag == "struct" else [])
            elif parent is None:
                if tag != root:
                    raise MalformedXmlRpc(f"root element is <{tag}>, not <{root}>")
                found["root"] = tag
            elif tag == "nil" and not allow_nil:
                raise MalformedXmlRpc("<nil/> is not accepted here")

        def set_value(value: Any) -> None:
            if values[-1] is not unset:
                raise MalformedXmlRpc("a <value> holds more than one value")
            values[-1] = value

        def end(tag: str) -> None:
            tags.pop()
            if tag == "value":
                value = values.pop()
                if value is unset:  # <value>text</value>: an untyped string
                    value = "".join(text)
                parent = tags[-1]
                if parent == "member":
                    members[-1][1] = value
                elif parent == "data":
                    containers[-1].append(value)
                elif parent == "param":
                    params.append(value)
                else:
                    found["fault"] = value
            elif tag == "member":
                name, value = members.pop()
                if name is unset or value is unset:
                    raise MalformedXmlRpc("a struct member needs a <name> and a <value>")
                containers[-1][name] = value
            elif tag == "name":
                members[-1][0] = "".join(text)
            elif (convert := scalars.get(tag)) is not None:
                try:
                    set_value(convert("".join(text)))
                except (ValueError, TypeError, binascii.Error) as exc:
                    raise MalformedXmlRpc(f"bad <{tag}> value: {str(exc)[:100]}") from None
            elif tag == "struct" or tag == "array":
                set_value(containers.pop())
            elif tag == "nil":
                set_value(None)
            elif tag == "methodName":
                found["method"] = "".join(text).strip()

        self.start, self.end, self.data = start, end, text.append
        self.tags, self.params, self.found = tags, params, found

    def xml(self, encoding: str | None, standalone: Any) -> None:
        """Called by the stdlib parser wrapper; nothing to record."""

    def close(self) -> None:
        """Called by the stdlib parser wrapper at the end."""


def decode(body: bytes, policy: Policy) -> Decoded:
    """Decode a whole XML-RPC document under ``policy``; :class:`MalformedXmlRpc` for anything
    oversized, hostile, malformed, incomplete or outside the policy. Pure CPU; any thread."""
    if not isinstance(body, (bytes, bytearray)):
        raise MalformedXmlRpc(f"the body must be bytes, not {type(body).__name__}")
    if policy.max_bytes is not None and len(body) > policy.max_bytes:
        raise MalformedXmlRpc(f"{len(body)} bytes, over the {policy.max_bytes}-byte cap")
    if not body.strip():
        raise MalformedXmlRpc("empty document")
    target = _Target(policy)
    parser = DefusedExpatParser(target, forbid_dtd=True)
    # One text callback per text node instead of per chunk (the stdlib wrapper keeps the expat
    # parser in ``_parser``; this only changes buffering, not what is accepted).
    parser._parser.buffer_text = True  # type: ignore[attr-defined]
    try:
        parser.feed(body)
        parser.close()
    except MalformedXmlRpc:
        raise
    except DefusedXmlException as exc:
        raise MalformedXmlRpc(f"DTDs and entities are not accepted ({type(exc).__name__})") from None
    except ExpatError as exc:
        raise MalformedXmlRpc(f"not well-formed XML: {exc}") from None
    except (IndexError, KeyError, AttributeError, RecursionError, UnicodeError, ValueError) as exc:
        raise MalformedXmlRpc(f"malformed structure: {type(exc).__name__}") from None
    found = target.found
    if "root" not in found:
        raise MalformedXmlRpc("incomplete document")
    if target.tags:
        raise MalformedXmlRpc("incomplete document")
    method = found.get("method")
    if policy.root == "methodCall":
        if not method:
            raise MalformedXmlRpc("no <methodName>")
        if len(method) > _MAX_METHOD_NAME or not _METHOD_NAME.fullmatch(method):
            raise MalformedXmlRpc(f"invalid method name {method[:40]!r}")
    return Decoded(method, tuple(target.params), found.get("fault"))


# --------------------------------------------------------------------------- encoders

def dump_response(value: Any, *, allow_none: bool = False) -> bytes:
    """The UTF-8 ``methodResponse`` body carrying ``value``. Raises TypeError (or
    OverflowError) for a value XML-RPC cannot carry."""
    return xmlrpc.client.dumps((value,), methodresponse=True, allow_none=allow_none, encoding="utf-8").encode(
        "utf-8"
    )


def dump_fault(fault: xmlrpc.client.Fault) -> bytes:
    """The UTF-8 ``methodResponse`` body carrying ``fault``."""
    return xmlrpc.client.dumps(fault, methodresponse=True, allow_none=False, encoding="utf-8").encode("utf-8")


def dump_call(method: str, params: tuple[Any, ...], *, allow_none: bool = True) -> bytes:
    """The UTF-8 ``methodCall`` body of ``method(*params)``."""
    return xmlrpc.client.dumps(params, method, allow_none=allow_none, encoding="utf-8").encode("utf-8")
