"""PLCAPI BootAuth (HMAC) and session auth structs, checked against independently computed values."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from nodemanager.authority.auth import hmac_auth, session_auth, verify_hmac_auth
from nodemanager.core.errors import PermissionDenied


def test_getslivers_value_is_the_hmac_of_empty_brackets() -> None:
    expected = hmac.new(b"secret-node-key", b"[]", hashlib.sha1).hexdigest()
    assert hmac_auth(7, "secret-node-key") == {"AuthMethod": "hmac", "node_id": 7, "value": expected}


def test_known_vector_with_nested_parameters() -> None:
    # Flattened string forms: "zeta", "b", "10", "a" (dict values only), "True" -> sorted:
    # "10", "True", "a", "b", "zeta" -> message "[10Trueabzeta]".
    params = ["zeta", ["b", (10, {"ignored-key": "a"})], True]
    expected = hmac.new("clé".encode(), b"[10Trueabzeta]", hashlib.sha1).hexdigest()
    assert hmac_auth(3, "clé", params)["value"] == expected
    assert expected == "%s" % hmac.new("clé".encode("utf-8"), b"[10Trueabzeta]", "sha1").hexdigest()


def test_verify_accepts_the_right_key_and_returns_the_node_id() -> None:
    auth = hmac_auth(7, "k7", ["site_x"])
    assert verify_hmac_auth(auth, {7: "k7", 8: "k8"}, ["site_x"]) == 7


@pytest.mark.parametrize(
    ("auth", "params", "why"),
    [
        (hmac_auth(7, "wrong"), (), "node 7"),
        (hmac_auth(9, "k7"), (), "node 9"),
        (hmac_auth(7, "k7", ["a"]), ["b"], "node 7"),
        ({**hmac_auth(7, "k7"), "node_id": "7"}, (), "integer"),
        ({**hmac_auth(7, "k7"), "value": None}, (), "string"),
        ({**hmac_auth(7, "k7"), "AuthMethod": "password"}, (), "AuthMethod"),
        (session_auth("abc"), (), "AuthMethod"),
        ("not a struct", (), "struct"),
    ],
)
def test_verify_refuses(auth: object, params: object, why: str) -> None:
    with pytest.raises(PermissionDenied, match=why):
        verify_hmac_auth(auth, {7: "k7"}, params)  # type: ignore[arg-type]


def test_session_auth_struct() -> None:
    assert session_auth("s3ss10n") == {"AuthMethod": "session", "session": "s3ss10n"}
