"""The bundled authority's data: a declarative TOML file -> validated, per-node documents.

The file (see ``examples/demo-slices.toml``)::

    [authority]                  # optional
    timestamp = "mtime"          # default: the file's modification time; or a fixed epoch (int)
    key_file = ""                # ticket signing key (PEM, RSA); default "<data file>.key.pem"
    cert_file = ""               # its self-signed certificate, given to nodes (authority.ticket_cert);
                                 # default "<data file>.cert.pem". Relative paths: next to the data
                                 # file. Both are generated on first use (the key with mode 0600).
    ticket_lifetime = "1d"       # validity of issued tickets: seconds, or a number with s m h d w

    [[nodes]]
    id = 1                       # the node id the node manager holds in authority.node_id_file
    hostname = "node1.example.org"
    key = "secret-node-key"      # the shared node key (authority.node_key_file), HMAC BootAuth
    bwcap = 100000               # optional: the node's bandwidth cap in kbit/s

    [[slices]]
    name = "site_alpha"          # a valid slice name (core.records.validate_name)
    id = 101                     # slice_id, unique
    instantiation = "plc-instantiated"  # default; or delegated | nm-controller | not-instantiated
    expires = "+30d"             # default "+30d": the file's modification time plus 30 days, rounded up to a day
                                 # (s, m, h, d, w suffixes), or an absolute epoch (int)
    nodes = [1]                  # default "all"
    keys = ["ssh-ed25519 AAAA... alice@example.org"]   # OpenSSH public key lines
    initscript = "echo hello"    # optional: the script text (sent as the initscript_code tag)
    controller = "site_ctrl"     # delegated slices only: an nm-controller slice of this file
    description = "..."          # optional, informational (not sent to nodes)
    [slices.attributes]          # slice tags, in order; a list repeats the tag (vsys = ["a", "b"])
    nm_cpu_share = 2             # ints become strings, as PLC sends them

    [[users]]                    # people who may get tickets (GetSliceTicket)
    name = "carol"               # the Username of PLCAPI's password auth struct
    password_sha256 = "..."      # hex SHA-256 of the password (AuthString)
    slices = ["site_ctrl"]       # slices carol belongs to: she may get tickets for each delegated
                                 # slice among them and for each delegated slice they control

Validation is complete and up front: an error names the slice (or node) and the field, e.g.
``slices[2] ('site_beta').expires: ...``, so a typo never reaches a node.

Relative expiries (``expires = "+30d"``) count from the file's modification time and are rounded
UP to a whole day (UTC midnight) -- or to a whole hour for a duration under a day -- by
:func:`relative_expiry`: a sliver lives at least the duration asked, and an edit of the file leaves
every other slice's ``expires`` unchanged (except once a day, when the rounded value moves). So an
edit that concerns one node changes that node's document only, and blocking queries wake only that
node (docs/blocking-queries.md); an unchanged file yields identical documents. Relative lease times
(``t_from = "+1h"``) are exact offsets from the modification time: they concern only their node.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
from lxml import etree

from ..core.errors import ConfigError, InvalidName
from ..core.records import DELEGATED, INSTANTIATIONS, NM_CONTROLLER, PLC_INSTANTIATED, validate_name
from ..authority.parse import is_openssh_public_key, is_tag_name
from .conffiledata import DEFAULT_DIR, ConfFileEntry, ConfFileSpec, conf_files_for, parse_conf_files
from .leasedata import LeaseSpec, NodeLeases, parse_node_leases

XMLRPC_INT_MAX = 2**31 - 1
#: Characters XML 1.0 cannot carry (nor XML-RPC, nor slices.xml): refused up front.
_XML_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_RELATIVE = re.compile(r"\+([0-9]{1,9})([smhdw])")
_DURATION = re.compile(r"\+?([0-9]{1,9})([smhdw]?)")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: Tags carried by dedicated fields; setting them as attributes would be ambiguous.
_FIELD_TAGS = {"controller": "controller", "delegations": "controller", "initscript_code": "initscript"}
SLICE_FAMILY = "nodemanager"


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class _AuthoritySettings(_Struct):
    timestamp: int | str = "mtime"
    key_file: str = ""
    cert_file: str = ""
    ticket_lifetime: int | str = "1d"
    conf_files_dir: str = DEFAULT_DIR


class _NodeSpec(_Struct):
    id: int
    key: str
    hostname: str = ""
    bwcap: int | None = None
    reservation_policy: str = "none"
    lease_granularity: int = 3600
    leases: list[LeaseSpec] = msgspec.field(default_factory=list)


AttributeValue = str | int | list[str | int]


class _SliceSpec(_Struct):
    name: str
    id: int
    instantiation: str = PLC_INSTANTIATED
    expires: int | str = "+30d"
    nodes: list[int] | str = "all"
    keys: list[str] = msgspec.field(default_factory=list)
    initscript: str = ""
    controller: str = ""
    description: str = ""
    attributes: dict[str, AttributeValue] = msgspec.field(default_factory=dict)


class _UserSpec(_Struct):
    name: str
    password_sha256: str
    slices: list[str] = msgspec.field(default_factory=list)


class _AuthorityFile(_Struct):
    authority: _AuthoritySettings = msgspec.field(default_factory=_AuthoritySettings)
    nodes: list[_NodeSpec] = msgspec.field(default_factory=list)
    slices: list[_SliceSpec] = msgspec.field(default_factory=list)
    users: list[_UserSpec] = msgspec.field(default_factory=list)
    conf_files: list[ConfFileSpec] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NodeEntry:
    node_id: int
    hostname: str
    key: str
    bwcap_kbps: int | None
    #: ``reservation_policy``, ``lease_granularity`` and ``leases`` (:mod:`.leasedata`).
    leases: NodeLeases = NodeLeases()


@dataclass(frozen=True, slots=True)
class SliceEntry:
    name: str
    slice_id: int
    instantiation: str
    expires: int
    nodes: frozenset[int] | None  # None: every node
    keys: tuple[str, ...]
    attributes: tuple[tuple[str, str], ...]
    initscript: str
    controller: str


@dataclass(frozen=True, slots=True)
class UserEntry:
    """Someone who may ask for tickets: ``password_sha256`` is the hex digest of the password;
    ``slices`` the slices the user belongs to."""

    name: str
    password_sha256: str
    slices: frozenset[str]


@dataclass(frozen=True, slots=True)
class TicketSettings:
    """Where the ticket signing key and certificate live (empty: next to the data file) and how
    long an issued ticket is valid."""

    key_file: str = ""
    cert_file: str = ""
    lifetime: int = 86400


@dataclass(frozen=True, slots=True)
class AuthorityData:
    """Everything the bundled authority serves, validated. ``timestamp`` stamps every document."""

    timestamp: int
    nodes: Mapping[int, NodeEntry]
    slices: tuple[SliceEntry, ...]
    users: Mapping[str, UserEntry] = field(default_factory=dict)
    tickets: TicketSettings = TicketSettings()
    #: ``[[conf_files]]`` (:mod:`.conffiledata`) and the directory serving their content.
    conf_files: tuple[ConfFileEntry, ...] = ()
    conf_files_dir: str = DEFAULT_DIR

    def slice(self, name: str) -> SliceEntry | None:
        return next((entry for entry in self.slices if entry.name == name), None)

    @property
    def node_keys(self) -> dict[int, str]:
        return {node_id: node.key for node_id, node in self.nodes.items()}

    def node(self, node_id: int) -> NodeEntry:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"unknown node {node_id}") from None

    def slices_for(self, node_id: int) -> tuple[SliceEntry, ...]:
        return tuple(s for s in self.slices if s.nodes is None or node_id in s.nodes)


def _fail(origin: str, where: str, why: str) -> ConfigError:
    return ConfigError(f"{origin}: {where}: {why}")


def _msgspec_where(message: str, raw: Mapping[str, Any]) -> str:
    """Turn msgspec's ``$.slices[2].expires`` into ``slices[2] ('name').expires``."""
    match = re.search(r"at `\$\.?([^`]*)`", message)
    path = match.group(1) if match else "?"
    slice_match = re.match(r"slices\[(\d+)\](.*)", path)
    if slice_match:
        index = int(slice_match.group(1))
        slices = raw.get("slices")
        entry = slices[index] if isinstance(slices, list) and index < len(slices) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"slices[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")
        return label + slice_match.group(2)
    return path


def relative_expiry(base_time: int, seconds: int) -> int:
    """``base_time + seconds`` rounded up to a whole day (86400 s), or to a whole hour for a
    duration under a day: later edits of the file on the same day (hour) give the same value."""
    step = 86400 if seconds >= 86400 else 3600
    return min(-(-(base_time + seconds) // step) * step, XMLRPC_INT_MAX)


def _slice_expires(value: int | str, base: int) -> int:
    if isinstance(value, int):
        return _expires(value, base)
    match = _RELATIVE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{value!r} is neither an epoch nor a relative time like '+30d'")
    return relative_expiry(base, int(match.group(1)) * _UNITS[match.group(2)])


def _expires(value: int | str, base: int) -> int:
    if isinstance(value, int):
        if not 0 <= value <= XMLRPC_INT_MAX:
            raise ValueError(f"must be between 0 and {XMLRPC_INT_MAX}")
        return value
    match = _RELATIVE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{value!r} is neither an epoch nor a relative time like '+30d'")
    result = base + int(match.group(1)) * _UNITS[match.group(2)]
    return min(result, XMLRPC_INT_MAX)


def parse_duration(value: int | str) -> int:
    """Seconds from an int, or from text like ``"3600"``, ``"12h"``, ``"+1d"`` (s m h d w);
    ``ValueError`` otherwise. Used for ticket lifetimes (``ticket_lifetime``, ``--ttl``)."""
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration like '3600', '12h' or '1d'")
        seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 0 < seconds <= XMLRPC_INT_MAX:
        raise ValueError(f"a duration must be between 1 and {XMLRPC_INT_MAX} seconds")
    return seconds


def _attributes(raw: Mapping[str, AttributeValue]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for tag, value in raw.items():
        if not is_tag_name(tag):
            raise ValueError(f"{tag!r} is not a valid tag name")
        if tag in _FIELD_TAGS:
            raise ValueError(f"set {tag!r} with the slice's {_FIELD_TAGS[tag]!r} field")
        for item in value if isinstance(value, list) else [value]:
            text = str(item)
            if _XML_UNSAFE.search(text):
                raise ValueError(f"{tag!r} contains a control character XML cannot carry")
            out.append((tag, text))
    return tuple(out)


def parse_authority_data(raw: Mapping[str, Any], *, timestamp: int, base_time: int, origin: str) -> AuthorityData:
    """Validate the decoded TOML. ``timestamp`` is used unless the file fixes one; relative
    times count from ``base_time`` (the file's modification time; see :func:`relative_expiry`)."""
    try:
        spec = msgspec.convert(dict(raw), _AuthorityFile, strict=True)
    except msgspec.ValidationError as exc:
        raise _fail(origin, _msgspec_where(str(exc), raw), str(exc).split(" - at")[0]) from exc
    setting = spec.authority.timestamp
    if isinstance(setting, int):
        if not 0 <= setting <= XMLRPC_INT_MAX:
            raise _fail(origin, "authority.timestamp", f"must be between 0 and {XMLRPC_INT_MAX}")
        timestamp = setting
    elif setting != "mtime":
        raise _fail(origin, "authority.timestamp", 'must be "mtime" or an integer epoch')

    nodes: dict[int, NodeEntry] = {}
    for index, node in enumerate(spec.nodes):
        where = f"nodes[{index}] (id {node.id})"
        if not 0 < node.id <= XMLRPC_INT_MAX:
            raise _fail(origin, f"{where}.id", "must be a positive 32-bit integer")
        if node.id in nodes:
            raise _fail(origin, f"{where}.id", "is given to more than one node")
        if not node.key.strip() or _XML_UNSAFE.search(node.key):
            raise _fail(origin, f"{where}.key", "must be non-empty printable text")
        if _XML_UNSAFE.search(node.hostname):
            raise _fail(origin, f"{where}.hostname", "contains a control character")
        if node.bwcap is not None and not 0 < node.bwcap <= XMLRPC_INT_MAX:
            raise _fail(origin, f"{where}.bwcap", "must be a positive number of kbit/s")
        nodes[node.id] = NodeEntry(node.id, node.hostname, node.key.strip(), node.bwcap)

    by_name = {s.name: s for s in spec.slices}
    slices: list[SliceEntry] = []
    seen_ids: set[int] = set()
    for index, item in enumerate(spec.slices):
        where = f"slices[{index}] ({item.name!r})"
        try:
            validate_name(item.name)
        except InvalidName as exc:
            raise _fail(origin, f"{where}.name", str(exc)) from exc
        if any(s.name == item.name for s in slices):
            raise _fail(origin, f"{where}.name", "is given to more than one slice")
        if not 0 <= item.id <= XMLRPC_INT_MAX or item.id in seen_ids:
            raise _fail(origin, f"{where}.id", "must be a unique non-negative 32-bit integer")
        seen_ids.add(item.id)
        if item.instantiation not in INSTANTIATIONS:
            raise _fail(origin, f"{where}.instantiation", f"must be one of {', '.join(INSTANTIATIONS)}")
        try:
            expires = _slice_expires(item.expires, base_time)
        except ValueError as exc:
            raise _fail(origin, f"{where}.expires", str(exc)) from exc
        if isinstance(item.nodes, str):
            if item.nodes != "all":
                raise _fail(origin, f"{where}.nodes", 'must be a list of node ids or "all"')
            node_set: frozenset[int] | None = None
        else:
            unknown = sorted(set(item.nodes) - set(nodes))
            if unknown:
                raise _fail(origin, f"{where}.nodes", f"unknown node id(s) {unknown}")
            node_set = frozenset(item.nodes)
        for number, key in enumerate(item.keys):
            if not is_openssh_public_key(key.strip()):
                raise _fail(origin, f"{where}.keys[{number}]", "is not a one-line OpenSSH public key")
        if item.controller:
            target = by_name.get(item.controller)
            if item.instantiation != DELEGATED:
                raise _fail(origin, f"{where}.controller", "only a delegated slice has a controller")
            if target is None or target.instantiation != NM_CONTROLLER:
                why = f"{item.controller!r} is not an nm-controller slice of this file"
                raise _fail(origin, f"{where}.controller", why)
        if _XML_UNSAFE.search(item.initscript):
            raise _fail(origin, f"{where}.initscript", "contains a control character XML cannot carry")
        try:
            attributes = _attributes(item.attributes)
        except ValueError as exc:
            raise _fail(origin, f"{where}.attributes", str(exc)) from exc
        slices.append(
            SliceEntry(
                name=item.name,
                slice_id=item.id,
                instantiation=item.instantiation,
                expires=expires,
                nodes=node_set,
                keys=tuple(key.strip() for key in item.keys),
                attributes=attributes,
                initscript=item.initscript,
                controller=item.controller,
            )
        )
    try:
        lifetime = parse_duration(spec.authority.ticket_lifetime)
    except ValueError as exc:
        raise _fail(origin, "authority.ticket_lifetime", str(exc)) from exc
    settings = TicketSettings(spec.authority.key_file, spec.authority.cert_file, lifetime)
    users: dict[str, UserEntry] = {}
    for index, user in enumerate(spec.users):
        where = f"users[{index}] ({user.name!r})"
        if not _USER_NAME.fullmatch(user.name):
            raise _fail(origin, f"{where}.name", "must be 1-128 characters of letters, digits and _.@+-")
        if user.name in users:
            raise _fail(origin, f"{where}.name", "is given to more than one user")
        if not _SHA256_HEX.fullmatch(user.password_sha256):
            raise _fail(origin, f"{where}.password_sha256", "must be 64 lower-case hex digits")
        unknown = sorted(set(user.slices) - set(by_name))
        if unknown:
            raise _fail(origin, f"{where}.slices", f"unknown slice(s) {unknown}")
        users[user.name] = UserEntry(user.name, user.password_sha256, frozenset(user.slices))
    slice_ids = {entry.name: entry.slice_id for entry in slices}
    for index, node in enumerate(spec.nodes):
        leases = parse_node_leases(f"nodes[{index}] (id {node.id})", node.reservation_policy, node.lease_granularity,
                                   node.leases, slice_ids, lambda value: _expires(value, base_time),
                                   lambda where, why: _fail(origin, where, why))
        nodes[node.id] = replace(nodes[node.id], leases=leases)
    conf_files = parse_conf_files(spec.conf_files, nodes, origin)
    return AuthorityData(timestamp=timestamp, nodes=nodes, slices=tuple(slices), users=users, tickets=settings,
                         conf_files=conf_files, conf_files_dir=spec.authority.conf_files_dir)


def load_authority_text(text: str, *, timestamp: int, base_time: int, origin: str) -> AuthorityData:
    """Parse the TOML text of an authority data file (see the module docstring)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    return parse_authority_data(raw, timestamp=timestamp, base_time=base_time, origin=origin)


# --------------------------------------------------------------------------- per-node documents


def sliver_attributes(entry: SliceEntry) -> list[tuple[str, str]]:
    """The slice's tags as nodes receive them: its attributes, then ``controller`` and
    ``initscript_code`` from the dedicated fields."""
    extra = []
    if entry.controller:
        extra.append(("controller", entry.controller))
    if entry.initscript:
        extra.append(("initscript_code", entry.initscript))
    return list(entry.attributes) + extra


def sliver_struct(entry: SliceEntry) -> dict[str, Any]:
    """One sliver of a GetSlivers answer: the same for every node the slice is on."""
    return {
        "name": entry.name,
        "slice_id": entry.slice_id,
        "instantiation": entry.instantiation,
        "expires": entry.expires,
        "keys": [{"key_type": "ssh", "key": key} for key in entry.keys],
        "attributes": [{"tagname": tag, "value": value} for tag, value in sliver_attributes(entry)],
        "GetSliceFamily": SLICE_FAMILY,
    }


def node_members(data: AuthorityData, node_id: int) -> dict[str, Any]:
    """The members of ``node_id``'s GetSlivers answer other than ``slivers`` (KeyError if the
    node is unknown)."""
    node = data.node(node_id)
    members: dict[str, Any] = {
        "timestamp": data.timestamp,
        "node_id": node.node_id,
        "hostname": node.hostname,
        "initscripts": [],
    }
    if node.bwcap_kbps is not None:
        members["bwcap"] = node.bwcap_kbps
    if data.conf_files:
        members["conf_files"] = conf_files_for(data.conf_files, node_id)
    members.update(node.leases.members())
    return members


def getslivers_struct(data: AuthorityData, node_id: int) -> dict[str, Any]:
    """The GetSlivers answer for ``node_id`` (KeyError if the node is unknown)."""
    document = node_members(data, node_id)
    document["slivers"] = [sliver_struct(entry) for entry in data.slices_for(node_id)]
    return document


def slices_xml(data: AuthorityData, node_id: int) -> bytes:
    """The slices.xml document for ``node_id`` (KeyError if the node is unknown)."""
    node = data.node(node_id)
    root = etree.Element("slices", timestamp=str(data.timestamp), node_id=str(node.node_id))
    if node.hostname:
        root.set("hostname", node.hostname)
    if node.bwcap_kbps is not None:
        root.set("bwcap", str(node.bwcap_kbps))
    for entry in data.slices_for(node_id):
        element = etree.SubElement(
            root,
            "slice",
            name=entry.name,
            id=str(entry.slice_id),
            instantiation=entry.instantiation,
            expires=str(entry.expires),
        )
        for key in entry.keys:
            etree.SubElement(element, "key", type="ssh").text = key
        for tag, value in sliver_attributes(entry):
            etree.SubElement(element, "attribute", name=tag, value=value)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
