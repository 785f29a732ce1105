"""Hypothesis profiles for the fuzz targets, and the strategies they share.

Profiles (choose with ``--hypothesis-profile``):

* ``ci`` (the default here): ~150 examples per target, the whole folder in seconds -- part of
  ``make test``;
* ``long``: thousands of examples per target -- ``make fuzz``.

The profile is applied per test (:func:`fuzz_settings`) rather than loaded globally, so running
this folder with the rest of the suite does not change other tests' hypothesis settings. No
example database is written (``database=None``): CI starts clean and the work tree stays clean.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("ci", max_examples=150, **_COMMON)
settings.register_profile("long", max_examples=5000, **_COMMON)


def fuzz_settings() -> settings:
    """The ``long`` profile when it was asked for, else ``ci``."""
    return settings.get_profile("long" if settings.get_current_profile_name() == "long" else "ci")


#: Strings that matter to the parsers: valid and nearly-valid names, tags, keys, numbers.
INTERESTING_TEXT = st.sampled_from([
    "", " ", "site_alpha", "Site_alpha", "site-alpha", "site_", "_x", "a" * 33, "a_" + "b" * 62,
    "plc-instantiated", "delegated", "nm-controller", "not-instantiated", "nm_cpu_share",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFuzzKey000000000000000000000000000000000 f@z",
    "-1", "0", "4294967296", "1e9", "\x00", "\u202e", "../..", "<x/>", "&amp;",
])
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=40) | st.binary(max_size=16) | INTERESTING_TEXT
)
#: Anything an XML-RPC or JSON document could decode to (and a little more).
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=12) | INTERESTING_TEXT, children, max_size=6),
    max_leaves=40,
)

#: Byte snippets that stress XML parsers when spliced into a document.
XML_SNIPPETS = [
    b"<!DOCTYPE x [<!ENTITY a 'bbbbbbbb'>]>", b"&a;", b"&#0;", b"&#x110000;", b"<![CDATA[", b"]]>",
    b"<slice name='site_x'/>", b"</slices>", b"<slices>", b"\x00", b"\xff\xfe", b"\xc3", b'"', b"'",
    b"<", b">", b"<?xml version='1.0' encoding='latin-1'?>", b"<!-- -->", b"xmlns:a='urn:x'",
    b"<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='/etc/passwd'/>",
]


@st.composite
def mutated_bytes(draw: st.DrawFn, original: bytes, max_ops: int = 4) -> bytes:
    """``original`` with a few byte-level mutations: flips, deletions, insertions of snippets,
    duplication and truncation."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, max_ops))):
        position = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "delete", "insert", "snippet", "duplicate", "truncate"]))
        if op == "flip" and position < len(data):
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del data[position:position + draw(st.integers(1, 16))]
        elif op == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif op == "snippet":
            data[position:position] = draw(st.sampled_from(XML_SNIPPETS))
        elif op == "duplicate":
            data[position:position] = data[position:position + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[position:]
    return bytes(data)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, member in value.items():
            found += _paths(member, prefix + (key,))
    elif isinstance(value, list):
        for index, member in enumerate(value):
            found += _paths(member, prefix + (index,))
    return found


@st.composite
def mutated_structure(draw: st.DrawFn, original: Any, max_ops: int = 3) -> Any:
    """A deep copy of ``original`` (dicts and lists) with a few members replaced by arbitrary
    values, deleted, duplicated or given an extra sibling."""
    import copy

    value = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, max_ops))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        if not path:
            if draw(st.booleans()):
                value = draw(VALUES)
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        op = draw(st.sampled_from(["replace", "delete", "duplicate", "add"]))
        if op == "replace":
            parent[last] = draw(VALUES)
        elif op == "delete":
            del parent[last]
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10) | INTERESTING_TEXT)] = draw(VALUES)
    return value
