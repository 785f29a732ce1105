"""A streaming, strict XML-RPC decoder on defusedxml's hardened expat parser.

Why not ``xmlrpc.client.loads``: unhardened (expat expands internal entities) and slower. Why not an
lxml tree: a 10,000-sliver GetSlivers answer is ~20 MB, and its tree costs ~300 MB of memory before
the first value is read. Here expat reports elements as they stream past and each value is built
once, so memory follows the *result*, not the document, and decoding is ~20 % faster than the
stdlib's.

Hardening comes from ``defusedxml.xmlrpc.DefusedExpatParser`` (DTDs, entity declarations and
external references refused); the structure is checked strictly as it streams: every element must
appear under its legal parent (a table), unknown value types are refused, and a document must end
complete. Anything wrong raises :class:`MalformedXmlRpc` with the reason.
"""

from __future__ import annotations

import xmlrpc.client
from base64 import b64decode
from typing import Any
from xml.parsers.expat import ExpatError

from defusedxml import DefusedXmlException
from defusedxml.xmlrpc import DefusedExpatParser


class MalformedXmlRpc(ValueError):
    """The body is not a well-formed, acceptable XML-RPC document (the message says why)."""


def _boolean(text: str) -> bool:
    text = text.strip()
    if text == "1":
        return True
    if text == "0":
        return False
    raise MalformedXmlRpc(f"boolean must be 0 or 1, not {text[:20]!r}")


def _date(text: str) -> xmlrpc.client.DateTime:
    return xmlrpc.client.DateTime(text.strip())


#: Scalar element -> converter of its text.
_SCALARS: dict[str, Any] = {
    "string": str,
    "int": int,
    "i4": int,
    "i8": int,
    "boolean": _boolean,
    "double": float,
    "base64": lambda text: b64decode(text, validate=False),
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
#: Deepest nesting of structs and arrays accepted. GetSlivers needs 3; this only refuses absurd
#: documents.
MAX_CONTAINER_DEPTH = 32


class _Target:
    """The expat target: closures over local lists (attribute lookups on ``self`` cost a third
    of the decoding time for a large document)."""

    def __init__(self) -> None:
        tags: list[str] = []
        text: list[str] = []
        values: list[Any] = []         # one slot per open <value>
        containers: list[Any] = []     # open dicts and lists
        members: list[list[Any]] = []  # [name, value] of open <member>s
        params: list[Any] = []
        found: dict[str, Any] = {}     # root, methodName, fault
        parents, scalars = _PARENTS, _SCALARS
        unset = _UNSET

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
                if len(containers) >= MAX_CONTAINER_DEPTH:
                    raise MalformedXmlRpc(f"values nested deeper than {MAX_CONTAINER_DEPTH} levels")
                containers.append({} if tag == "struct" else [])
            elif parent is None:
                found["root"] = tag

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
                except (ValueError, TypeError) as exc:
                    raise MalformedXmlRpc(f"bad <{tag}> value: {exc}") from None
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


def decode(body: bytes) -> tuple[str, str | None, tuple[Any, ...], Any]:
    """Decode a whole XML-RPC document.

    Returns ``(root tag, method name or None, params, fault value or None)``; raises
    :class:`MalformedXmlRpc` for anything hostile, malformed or incomplete."""
    target = _Target()
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
    except (IndexError, KeyError, AttributeError, RecursionError) as exc:
        raise MalformedXmlRpc(f"malformed structure: {type(exc).__name__}") from None
    if "root" not in target.found or target.tags:
        raise MalformedXmlRpc("incomplete document")
    found = target.found
    return found["root"], found.get("method"), tuple(target.params), found.get("fault")
