"""PLCAPI authentication structs: node "BootAuth" (HMAC) and session auth (authority.md).

BootAuth proves that the caller holds the node's shared key: the ``value`` is the HMAC-SHA1 hex
digest, keyed by the node key, of ``"[" + "".join(sorted(values)) + "]"`` (UTF-8), where ``values``
are the string forms of the call's other parameters, flattened: lists and tuples recursively,
structs by their values only (keys are not included, as in PLCAPI). ``GetSlivers`` has no other
parameter, so its message is ``"[]"`` and the value is a fixed per-node token: only HTTPS with a
verified certificate keeps it secret. Both sides of the exchange live here so that the node and the
bundled authority cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.errors import PermissionDenied

AUTH_HMAC = "hmac"
AUTH_SESSION = "session"


def _flatten(params: Sequence[Any] | Mapping[Any, Any], out: list[str]) -> list[str]:
    items = params.values() if isinstance(params, Mapping) else params
    for item in items:
        if isinstance(item, (list, tuple, Mapping)):
            _flatten(item, out)
        else:
            out.append(str(item))
    return out


def hmac_message(params: Sequence[Any] = ()) -> bytes:
    """The byte string BootAuth signs for a call with these (non-auth) parameters."""
    return ("[" + "".join(sorted(_flatten(params, []))) + "]").encode("utf-8")


def hmac_value(node_key: str, params: Sequence[Any] = ()) -> str:
    return hmac.new(node_key.encode("utf-8"), hmac_message(params), hashlib.sha1).hexdigest()


def hmac_auth(node_id: int, node_key: str, params: Sequence[Any] = ()) -> dict[str, Any]:
    """The PLCAPI BootAuth struct for a call by node ``node_id`` with the given other parameters."""
    return {"AuthMethod": AUTH_HMAC, "node_id": node_id, "value": hmac_value(node_key, params)}


def session_auth(session: str) -> dict[str, Any]:
    """The PLCAPI session auth struct (``authority.session_file``)."""
    return {"AuthMethod": AUTH_SESSION, "session": session}


def verify_hmac_auth(auth: object, node_keys: Mapping[int, str], params: Sequence[Any] = ()) -> int:
    """Check a BootAuth struct against the known node keys; return the authenticated node id.

    Raises :class:`PermissionDenied` with a reason that never reveals the expected value. The digest
    comparison is constant-time; an unknown node is checked against a dummy key so that it takes the
    same time as a wrong key."""
    if not isinstance(auth, Mapping):
        raise PermissionDenied("authentication must be a struct")
    if auth.get("AuthMethod") != AUTH_HMAC:
        raise PermissionDenied(f"unsupported AuthMethod {str(auth.get('AuthMethod'))[:40]!r}; expected 'hmac'")
    node_id, value = auth.get("node_id"), auth.get("value")
    if type(node_id) is not int:
        raise PermissionDenied("node_id must be an integer")
    if not isinstance(value, str):
        raise PermissionDenied("value must be a string")
    key = node_keys.get(node_id)
    expected = hmac_value(key if key is not None else "\0unknown-node", params)
    matches = hmac.compare_digest(expected.encode("ascii"), value.strip().lower().encode("utf-8", "replace"))
    if key is None or not matches:
        raise PermissionDenied(f"node {node_id} failed to authenticate")
    return node_id
