"""A sliver's uid: ``uid_base + slice_id``, the same on every node.

The authority numbers slices; the node adds a configured base (``slivers.uid_base``). Deriving the
uid instead of taking the next free one means a uid never passes from one slice to another: a
destroyed slice's number comes back only to the same slice, and files it left on a node (or on a
shared server that sees several nodes' uids) stay its own. Both backends use this module; it does
no I/O.
"""

from __future__ import annotations

from ..core.errors import BackendError

DEFAULT_UID_BASE = 100000
#: Lowest uid a sliver may get: below are system accounts and the distribution's first users.
MIN_SLIVER_UID = 1000
#: Highest: uids travel in XML-RPC's signed 32-bit ints (GetXIDs).
MAX_SLIVER_UID = 2**31 - 1
#: ``nobody``/``nogroup`` and the historical 16-bit "-1": meaningful to many programs.
RESERVED_UIDS = frozenset({65534, 65535})


def sliver_uid(name: str, slice_id: int, uid_base: int) -> int:
    """The uid of sliver ``name`` of slice ``slice_id``; raises ``BackendError`` (naming the
    sliver) when it would be outside [1000, 2^31-1] or one of the reserved 65534/65535."""
    uid = uid_base + slice_id
    if slice_id < 0:
        raise BackendError(f"sliver {name}: slice id {slice_id} is negative: no uid can be derived from it")
    if not MIN_SLIVER_UID <= uid <= MAX_SLIVER_UID:
        raise BackendError(f"sliver {name}: uid {uid} (uid_base {uid_base} + slice id {slice_id}) is outside "
                           f"[{MIN_SLIVER_UID}, {MAX_SLIVER_UID}]")
    if uid in RESERVED_UIDS:
        raise BackendError(f"sliver {name}: uid {uid} (uid_base {uid_base} + slice id {slice_id}) is reserved "
                           "(nobody/nogroup)")
    return uid
