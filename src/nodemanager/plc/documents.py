"""Per-node document versions (``nm_index``) for blocking queries.

A node's index names the content of its document: the GetSlivers struct of :mod:`.model` without
its ``timestamp`` (which moves on every edit of the file), serialized canonically (JSON, sorted
keys), hashed with SHA-256, the first 22 characters of its URL-safe base64 (132 bits). So an
unchanged document keeps its index across reloads, and any change of the node's slivers, keys,
attributes, leases, conf_files or bandwidth cap changes it. ``slices.xml`` is derived from the same
data, so its ``ETag`` is the same index.

A :class:`Snapshot` pairs a validated :class:`~.model.AuthorityData` with every node's index,
computed once per reload (off the event loop), and renders the nodes' XML-RPC answers: a slice's
sliver is marshalled once per snapshot and spliced into every node's answer, because a fleet-wide
change re-renders every node's answer at once. Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .model import AuthorityData, SliceEntry, getslivers_struct, node_members, sliver_struct

INDEX_LENGTH = 22
#: Members of the GetSlivers answer that are not part of the document's content.
VOLATILE_MEMBERS = frozenset({"timestamp", "nm_index"})


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _index_of(canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest)[:INDEX_LENGTH].decode("ascii")


def document_index(struct: Mapping[str, Any]) -> str:
    """The index of a GetSlivers struct (see the module doc): 22 characters of ``[A-Za-z0-9_-]``."""
    return _index_of(_canonical({key: value for key, value in struct.items() if key not in VOLATILE_MEMBERS}))


#: Stands for the slivers in a node's canonical JSON; the data can hold no control character,
#: so its JSON form (``"\u0000slivers\u0000"``) cannot occur otherwise.
_SLIVERS_MARK = "\x00slivers\x00"
_SLIVERS_MARK_JSON = json.dumps(_SLIVERS_MARK)


def _all_indexes(data: AuthorityData) -> dict[int, str]:
    """Every node's :func:`document_index`, with each slice's JSON made once (not once per node)."""
    slices: dict[str, str] = {}
    indexes = {}
    for node_id in data.nodes:
        members = node_members(data, node_id)
        del members["timestamp"]
        members["slivers"] = _SLIVERS_MARK
        parts = []
        for entry in data.slices_for(node_id):
            text = slices.get(entry.name)
            if text is None:
                text = slices[entry.name] = _canonical(sliver_struct(entry))
            parts.append(text)
        canonical = _canonical(members).replace(_SLIVERS_MARK_JSON, "[" + ",".join(parts) + "]", 1)
        indexes[node_id] = _index_of(canonical)
    return indexes


def getslivers_answer(data: AuthorityData, node_id: int, index: str | None = None) -> dict[str, Any]:
    """The GetSlivers struct of ``node_id`` with its ``nm_index`` (KeyError if the node is
    unknown). ``index``: the node's index if already known for this very ``data`` (a snapshot's)."""
    struct = getslivers_struct(data, node_id)
    struct["nm_index"] = document_index(struct) if index is None else index
    return struct


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The data as of one reload, with every node's document index."""

    data: AuthorityData
    indexes: Mapping[int, str]
    #: node id -> node key, for BootAuth (built once per reload, not per request).
    node_keys: Mapping[int, str]
    #: Counts reloads: a later snapshot has a greater generation.
    generation: int = 0
    #: slice name -> its sliver marshalled as an XML-RPC ``<value>`` (filled on first use; a
    #: race between two workers computes the same text twice, harmlessly).
    _slivers: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, data: AuthorityData, generation: int = 0) -> Snapshot:
        return cls(data, _all_indexes(data), data.node_keys, generation)

    def getslivers_body(self, node_id: int) -> bytes:
        """The XML-RPC methodResponse of ``GetSlivers`` for ``node_id`` (with its ``nm_index``),
        the same call :func:`getslivers_answer` would give. KeyError if the node is unknown."""
        members = node_members(self.data, node_id)
        members["nm_index"] = self.indexes[node_id]
        head = _marshal(members)  # "<value><struct>\n<member>...</member>\n</struct></value>\n"
        assert head.endswith(_STRUCT_END)
        slivers = "".join(self._sliver(entry) for entry in self.data.slices_for(node_id))
        return "".join((_RESPONSE_START, head[: -len(_STRUCT_END)], _SLIVERS_START, slivers, _SLIVERS_END,
                        _STRUCT_END, _RESPONSE_END)).encode("utf-8")

    def _sliver(self, entry: SliceEntry) -> str:
        text = self._slivers.get(entry.name)
        if text is None:
            text = self._slivers[entry.name] = _marshal(sliver_struct(entry))
        return text


_RESPONSE_START = "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n"
_RESPONSE_END = "</param>\n</params>\n</methodResponse>\n"
_STRUCT_END = "</struct></value>\n"
_SLIVERS_START = "<member>\n<name>slivers</name>\n<value><array><data>\n"
_SLIVERS_END = "</data></array></value>\n</member>\n"
_PARAMS_START = "<params>\n<param>\n"
_PARAMS_END = "</param>\n</params>\n"


def _marshal(value: Any) -> str:
    """``value`` as one XML-RPC ``<value>…</value>\n`` (the standard library's marshaller)."""
    text = xmlrpc.client.Marshaller("utf-8", allow_none=True).dumps([value])
    assert text.startswith(_PARAMS_START) and text.endswith(_PARAMS_END)
    return text[len(_PARAMS_START): -len(_PARAMS_END)]
