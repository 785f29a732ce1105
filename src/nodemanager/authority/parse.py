"""Authority documents -> validated :class:`AuthorityDocument` (authority.md).

Three wire formats reach the node: a PLCAPI ``GetSlivers`` XML-RPC answer, ``slices.xml`` and a
``slivers.json`` file. Each is decoded into the same GetSlivers-shaped mapping and goes through ONE
validation path, :func:`parse_getslivers_with_protection`, so every format obeys the same rules:

* a document malformed as a whole (not a struct, no integer timestamp, another node's id, no
  ``slivers`` array, bad XML, a DOCTYPE, over the size cap) raises :class:`DocumentRejected` and
  changes nothing;
* a single bad sliver entry is dropped as a :class:`Rejection` and nothing else of it is used, while
  its valid siblings proceed;
* the syntactically valid names of dropped entries are returned next to the document ("protected
  names"): the merge must never delete an existing sliver because its new entry was bad.

Everything a real PLCAPI sends is accepted unchanged: unknown members are ignored, ``<nil/>`` is
taken where PLC sends it, the bandwidth cap comes from the primary interface's ``bwlimit`` when
there is no ``bwcap``, ``delegations``/``controller`` name the controller, ``initscript`` names an
entry of the top-level ``initscripts`` array and ``initscript_code`` carries the script itself.

All XML (XML-RPC bodies included) goes through the hardened parser of :mod:`.safe_xml`; the size
cap is checked before parsing. Parsing plus validation stays within ~1.3x of a plain stdlib
``xmlrpc.client.loads`` of the same body (see ``bench/parse_bench.py``). The validation is
written for the happy path of 10,000-sliver documents: precompiled regexes,
``type(x) is int`` checks, reasons returned as strings rather than raised per item.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import ConfigError, DocumentRejected, InvalidName
from ..core.records import (
    INSTANTIATIONS,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    RESERVED_NAMES,
    SOURCE_AUTHORITY,
    AuthorityDocument,
    Rejection,
    Sliver,
    validate_name,
)
from .safe_xml import loads_xmlrpc_call, loads_xmlrpc_response, parse_xml_safely

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_XML_MAX_BYTES",
    "MIB",
    "KIND_JSON",
    "KIND_SLICES_XML",
    "KIND_XMLRPC",
    "document_kind",
    "is_openssh_public_key",
    "is_tag_name",
    "load_document",
    "loads_xmlrpc_call",
    "loads_xmlrpc_response",
    "parse_getslivers_with_protection",
    "parse_slices_xml",
    "parse_slivers_json",
    "parse_xml_safely",
]

MIB = 1 << 20
DEFAULT_XML_MAX_BYTES = 16 * MIB

KIND_XMLRPC = "xmlrpc"
KIND_SLICES_XML = "slices.xml"
KIND_JSON = "json"

_name_match = NAME_PATTERN.fullmatch
_INSTANTIATIONS = frozenset(INSTANTIATIONS)
#: PLC tag names are lower-case identifiers; a little more is tolerated, never spaces or controls.
_tag_match = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}").fullmatch
#: One OpenSSH public key line: known type, base64 blob, optional comment; no options prefix, no
#: control characters (so it can never inject a second authorized_keys line).
_key_match = re.compile(
    r"(?:ssh-(?:rsa|dss|ed25519)|ecdsa-sha2-nistp(?:256|384|521)"
    r"|sk-(?:ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)(?:-cert-v01@openssh\.com)?"
    r"[ \t]+[A-Za-z0-9+/]{16,}={0,3}(?:[ \t]+[^\x00-\x08\x0a-\x1f\x7f]*)?"
).fullmatch
_xml_int_match = re.compile(r"\s*-?[0-9]{1,19}\s*").fullmatch


def is_openssh_public_key(text: str) -> bool:
    """True for one ``type base64 [comment]`` OpenSSH public key line (no options, no controls)."""
    return _key_match(text) is not None


def is_tag_name(text: str) -> bool:
    """True for an acceptable attribute (slice tag) name."""
    return _tag_match(text) is not None


# --------------------------------------------------------------------------- validation


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _label(index: int, name: object) -> str:
    if isinstance(name, str) and len(name) <= 64 and name.isprintable():
        return f"#{index} {name!r}"
    return f"#{index}"


def _name_ok(name: object) -> bool:
    return (
        type(name) is str
        and len(name) <= NAME_MAX_LENGTH
        and _name_match(name) is not None
        and name not in RESERVED_NAMES
    )


def _name_problem(name: object) -> str:
    try:
        validate_name(name)
    except InvalidName as exc:
        return str(exc)
    return f"invalid slice name {_describe(name)}"


def _bwcap_kbps(data: Mapping[str, Any]) -> int | None:
    """``bwcap`` (kbit/s) when present, else the primary interface's ``bwlimit`` (bit/s) / 1000."""
    bwcap = data.get("bwcap")
    if bwcap is not None:
        if type(bwcap) is not int or bwcap <= 0:
            raise DocumentRejected(f"bwcap must be a positive integer (kbit/s), not {_describe(bwcap)}")
        return bwcap
    interfaces = data.get("interfaces")
    if type(interfaces) is list:
        for iface in interfaces:
            if not isinstance(iface, Mapping):
                continue
            primary = iface.get("is_primary")
            if primary is True or (type(primary) is int and primary == 1):
                bwlimit = iface.get("bwlimit")
                if type(bwlimit) is int and bwlimit > 0:
                    return max(1, bwlimit // 1000)
                return None
    return None


def _initscript_table(raw: object) -> dict[str, str]:
    """Enabled entries of PLC's top-level ``initscripts`` array, by name; malformed ones ignored."""
    table: dict[str, str] = {}
    if type(raw) is list:
        for item in raw:
            if isinstance(item, Mapping):
                name, script, enabled = item.get("name"), item.get("script"), item.get("enabled")
                if (
                    type(name) is str
                    and type(script) is str
                    and (enabled is True or (type(enabled) is int and enabled == 1))
                    and "\x00" not in script
                ):
                    table.setdefault(name, script)
    return table


def _check_sliver(entry: Mapping[str, Any], timestamp: int, initscripts: dict[str, str]) -> Sliver | str:
    """The Sliver of one entry, or the reason it is rejected (a str; no exception per item)."""
    name = entry.get("name")
    if not _name_ok(name):
        return _name_problem(name)
    slice_id = entry.get("slice_id")
    if type(slice_id) is not int or slice_id < 0:
        return f"slice_id must be a non-negative integer, not {_describe(slice_id)}"
    instantiation = entry.get("instantiation")
    if type(instantiation) is not str or instantiation not in _INSTANTIATIONS:
        return f"unknown instantiation {_describe(instantiation)}"
    expires = entry.get("expires")
    if type(expires) is not int or expires < 0:
        return f"expires must be a non-negative integer, not {_describe(expires)}"

    keys: list[str] = []
    raw_keys = entry.get("keys")
    if raw_keys is not None:
        if type(raw_keys) is not list:
            return f"keys must be an array, not {_describe(raw_keys)}"
        for i, item in enumerate(raw_keys):
            if type(item) is not dict and not isinstance(item, Mapping):
                return f"key #{i} must be a struct {{key_type, key}}, not {_describe(item)}"
            key = item.get("key")
            if item.get("key_type") != "ssh":
                return f"key #{i} has key_type {_describe(item.get('key_type'))}; only 'ssh' is accepted"
            if type(key) is not str:
                return f"key #{i} must be a string, not {_describe(key)}"
            key = key.strip()
            if _key_match(key) is None:
                return f"key #{i} is not a one-line OpenSSH public key: {key[:40]!r}"
            keys.append(key)

    attributes: list[tuple[str, str]] = []
    controller: str | None = None
    initscript_name: str | None = None
    initscript_code: str | None = None
    raw_attributes = entry.get("attributes")
    if raw_attributes is not None:
        if type(raw_attributes) is not list:
            return f"attributes must be an array, not {_describe(raw_attributes)}"
        for i, item in enumerate(raw_attributes):
            if type(item) is not dict and not isinstance(item, Mapping):
                return f"attribute #{i} must be a struct {{tagname, value}}, not {_describe(item)}"
            tag, value = item.get("tagname"), item.get("value")
            if type(tag) is not str or _tag_match(tag) is None:
                return f"attribute #{i} has an invalid tagname {_describe(tag)}"
            if value is None:
                value = ""
            elif type(value) is not str:
                return f"attribute {tag!r} must have a string value, not {_describe(value)}"
            elif "\x00" in value:
                return f"attribute {tag!r} contains a NUL character"
            attributes.append((tag, value))
            if controller is None and (tag == "controller" or tag == "delegations"):
                controller = next((part.strip() for part in value.split(",") if part.strip()), "")
            elif tag == "initscript" and initscript_name is None:
                initscript_name = value
            elif tag == "initscript_code" and initscript_code is None:
                initscript_code = value

    if controller and not _name_ok(controller):
        return f"controller: {_name_problem(controller)}"
    if initscript_code is not None:
        initscript = initscript_code
    elif initscript_name is not None:
        initscript = initscripts.get(initscript_name, "")
    else:
        initscript = ""
    return Sliver(
        name=name,  # type: ignore[arg-type]  # checked by _name_ok
        slice_id=slice_id,
        instantiation=instantiation,
        expires=expires,
        timestamp=timestamp,
        source=SOURCE_AUTHORITY,
        keys=tuple(keys),
        attributes=tuple(attributes),
        initscript=initscript,
        controller=controller or "",
    )


#: Top-level members of a GetSlivers answer (authority.md "What a real PLCAPI sends") and what the
#: node does with each: parsed here, handed whole to a node-wide handler (``members``), or ignored
#: on purpose -- with a debug line naming it, so an operator can see nothing is half-used.
#: ``nm_index`` is the document's version for blocking queries (the bundled authority's): read by
#: the client (``authority.blocking.index_of_document``), never part of the records.
PARSED_MEMBERS = frozenset({"timestamp", "node_id", "hostname", "slivers", "initscripts", "bwcap", "interfaces",
                            "nm_index"})
HANDLED_MEMBERS = frozenset({"accounts", "conf_files", "reservation_policy", "lease_granularity", "leases"})
IGNORED_MEMBERS: Mapping[str, str] = {
    "hrn": "informational (the node's human-readable name)",
    "groups": "node groups: nothing on the node depends on them",
    "xmpp": "PLC's XMPP notification settings: this node has no XMPP client",
    "nm_not_modified": "only meaningful in a GetSliversWait answer (authority.blocking), not in a document",
}


def document_members(data: Mapping[str, Any]) -> dict[str, Any]:
    """The members for node-wide handlers (``HANDLED_MEMBERS`` present and not nil), logging at
    debug level each top-level member the node ignores (known ones with the reason)."""
    for key in data:
        if key in PARSED_MEMBERS or key in HANDLED_MEMBERS:
            continue
        reason = IGNORED_MEMBERS.get(key, "not a member this node knows") if isinstance(key, str) else "not a name"
        logger.debug("event=document-member-ignored member=%s reason=%s", str(key)[:40], reason)
    return {key: data[key] for key in HANDLED_MEMBERS if data.get(key) is not None}


def parse_getslivers_with_protection(
    data: Mapping[str, Any], *, expected_node_id: int | None, now: int | None = None
) -> tuple[AuthorityDocument, frozenset[str]]:
    """Validate a GetSlivers-shaped mapping: the document, and the protected names.

    Protected names are the syntactically valid names of rejected entries (bad content, or a name
    given more than once): the merge keeps an existing sliver of such a name untouched. When
    ``now`` is given, valid entries that have already expired are left out (neither kept nor
    protected): the sync would remove them at once anyway."""
    if not isinstance(data, Mapping):
        raise DocumentRejected(f"the document must be a struct, not {type(data).__name__}")
    timestamp = data.get("timestamp")
    if timestamp is None:
        raise DocumentRejected("the document has no timestamp")
    if type(timestamp) is not int or timestamp < 0:
        raise DocumentRejected(f"the timestamp must be a non-negative integer, not {_describe(timestamp)}")
    node_id = data.get("node_id")
    if node_id is not None:
        if type(node_id) is not int:
            raise DocumentRejected(f"node_id must be an integer, not {_describe(node_id)}")
        if expected_node_id is not None and node_id != expected_node_id:
            raise DocumentRejected(f"the document is for node {node_id}, this is node {expected_node_id}")
    hostname = data.get("hostname")
    if hostname is None:
        hostname = ""
    elif type(hostname) is not str or len(hostname) > 255 or not hostname.isprintable():
        raise DocumentRejected(f"hostname must be a printable string, not {_describe(hostname)}")
    entries = data.get("slivers")
    if type(entries) is not list:
        raise DocumentRejected(f"slivers must be an array, not {_describe(entries)}")
    bwcap = _bwcap_kbps(data)
    initscripts = _initscript_table(data.get("initscripts"))

    counts = Counter(
        name for e in entries if isinstance(e, Mapping) and type(name := e.get("name")) is str
    )
    duplicates = {name for name, count in counts.items() if count > 1}
    slivers: list[Sliver] = []
    rejected: list[Rejection] = []
    protected: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            rejected.append(Rejection(f"#{index}", f"a sliver must be a struct, not {_describe(entry)}"))
            continue
        name = entry.get("name")
        if duplicates and type(name) is str and name in duplicates:
            result: Sliver | str = f"slice name {name!r} appears more than once in the document"
        else:
            result = _check_sliver(entry, timestamp, initscripts)
        if type(result) is str:
            rejected.append(Rejection(_label(index, name), result))
            if _name_ok(name):
                protected.add(name)  # type: ignore[arg-type]
        elif now is None or result.expires > now:  # type: ignore[union-attr]
            slivers.append(result)  # type: ignore[arg-type]
    document = AuthorityDocument(
        timestamp=timestamp,
        node_id=node_id,
        hostname=hostname,
        bwcap_kbps=bwcap,
        slivers=tuple(slivers),
        rejected=tuple(rejected),
        members=document_members(data),
    )
    return document, frozenset(protected)


# --------------------------------------------------------------------------- slices.xml / json


def _xml_int(text: str | None) -> int | str | None:
    """An integer attribute; anything else is passed through for the validator to reject."""
    if text is not None and _xml_int_match(text):
        return int(text)
    return text


def _element_text(element: Any) -> str | None:
    # Mixed content (child elements) is refused rather than silently truncated.
    return (element.text or "") if len(element) == 0 else None


def parse_slices_xml(
    body: bytes, *, expected_node_id: int | None, max_bytes: int = DEFAULT_XML_MAX_BYTES, now: int | None = None
) -> tuple[AuthorityDocument, frozenset[str]]:
    """A ``slices.xml`` document (authority.md), mapped one-to-one to the GetSlivers shape."""
    root = parse_xml_safely(body, max_bytes=max_bytes, what="slices.xml")
    if root.tag != "slices":
        raise DocumentRejected(f"slices.xml: root element is <{str(root.tag)[:40]}>, not <slices>")
    slivers = []
    for element in root.iterchildren("slice"):
        keys = [
            {"key_type": key.get("type"), "key": _element_text(key)} for key in element.iterchildren("key")
        ]
        attributes = []
        for attribute in element.iterchildren("attribute"):
            value = attribute.get("value")
            attributes.append(
                {"tagname": attribute.get("name"), "value": _element_text(attribute) if value is None else value}
            )
        slivers.append(
            {
                "name": element.get("name"),
                "slice_id": _xml_int(element.get("id")),
                "instantiation": element.get("instantiation"),
                "expires": _xml_int(element.get("expires")),
                "keys": keys,
                "attributes": attributes,
            }
        )
    data = {
        "timestamp": _xml_int(root.get("timestamp")),
        "node_id": _xml_int(root.get("node_id")),
        "hostname": root.get("hostname"),
        "bwcap": _xml_int(root.get("bwcap")),
        "slivers": slivers,
    }
    return parse_getslivers_with_protection(data, expected_node_id=expected_node_id, now=now)


def parse_slivers_json(
    body: bytes, *, expected_node_id: int | None, max_bytes: int = DEFAULT_XML_MAX_BYTES, now: int | None = None
) -> tuple[AuthorityDocument, frozenset[str]]:
    """A ``slivers.json`` file: the GetSlivers struct as JSON."""
    if len(body) > max_bytes:
        raise DocumentRejected(f"slivers.json is {len(body)} bytes, over the {max_bytes}-byte cap")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise DocumentRejected(f"slivers.json is not valid JSON: {exc}") from exc
    return parse_getslivers_with_protection(data, expected_node_id=expected_node_id, now=now)


def document_kind(url: str) -> str:
    """Which format an authority URL serves (authority.md "Sources"); ConfigError if none."""
    parts = urlsplit(url)
    scheme, path = parts.scheme.lower(), parts.path.lower()
    if scheme not in ("http", "https", "file"):
        raise ConfigError(f"authority URL {url!r}: scheme must be http, https or file")
    if path.endswith(".json"):
        return KIND_JSON
    if path.endswith(".xml"):
        return KIND_SLICES_XML
    if scheme == "file":
        raise ConfigError(f"authority URL {url!r}: a file must be a slices.xml or a slivers.json")
    return KIND_XMLRPC


def load_document(
    url: str, body: bytes, *, expected_node_id: int | None, max_bytes: int, now: int | None = None
) -> tuple[AuthorityDocument, frozenset[str]]:
    """Parse ``body`` fetched from ``url`` with the parser its URL form calls for."""
    kind = document_kind(url)
    if kind == KIND_JSON:
        return parse_slivers_json(body, expected_node_id=expected_node_id, max_bytes=max_bytes, now=now)
    if kind == KIND_SLICES_XML:
        return parse_slices_xml(body, expected_node_id=expected_node_id, max_bytes=max_bytes, now=now)
    data = loads_xmlrpc_response(body, max_bytes)
    return parse_getslivers_with_protection(data, expected_node_id=expected_node_id, now=now)
