"""Name rules and the fingerprint (core.records)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nodemanager.core.errors import InvalidArgument, InvalidName
from nodemanager.core.records import NAME_MAX_LENGTH, Sliver, is_valid_name, validate_name


@pytest.mark.parametrize(
    "name",
    [
        "princeton_sirius",
        "a_b",
        "x_y_z",
        "pl_1",
        "site9_slice_2",
        "a_" + "b" * (NAME_MAX_LENGTH - 2),
    ],
)
def test_good_names_are_accepted(name: str) -> None:
    assert validate_name(name) == name
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "root",
        "a;b",
        "a_" + "b" * 198,  # 200 characters
        "a_" + "b" * (NAME_MAX_LENGTH - 1),  # one too many
        "",
        "Princeton_sirius",
        "princeton_Sirius",
        "x_",
        "_x",
        "x",
        "1a_b",
        "a-b_c",
        "a_b/c",
        "a_b\n",
        "a_b ",
        "a_b.c",
        "a_b\x00",
        "site_é",
    ],
)
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)
    assert not is_valid_name(name)


def test_reserved_names_are_rejected_even_when_they_match_the_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nodemanager.core import records

    assert is_valid_name("site_admin")
    monkeypatch.setattr(records, "RESERVED_NAMES", records.RESERVED_NAMES | {"site_admin"})
    with pytest.raises(InvalidName, match="reserved"):
        validate_name("site_admin")
    assert all(not is_valid_name(name) for name in records.RESERVED_NAMES)


@pytest.mark.parametrize("value", [None, 3, b"a_b", ["a_b"], ("a_b",)])
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(InvalidName, match="string"):
        validate_name(value)
    assert not is_valid_name(value)


def test_invalid_name_is_an_invalid_argument() -> None:
    assert issubclass(InvalidName, InvalidArgument)
    assert InvalidName.fault_code == 102


BASE = Sliver(
    name="site_a",
    slice_id=1,
    instantiation="plc-instantiated",
    expires=2_000_000_000,
    timestamp=100,
    keys=("ssh-ed25519 AAAA x@y",),
    attributes=(("nm_cpu_share", "2"),),
    initscript="echo hi",
)


@pytest.mark.parametrize(
    "changes",
    [
        {"keys": ("ssh-ed25519 BBBB x@y",)},
        {"keys": ()},
        {"attributes": (("nm_cpu_share", "3"),)},
        {"attributes": (("nm_cpu_share", "2"), ("vsys", "x"))},
        {"initscript": "echo bye"},
    ],
)
def test_fingerprint_changes_with_applied_content(changes: dict) -> None:
    assert replace(BASE, **changes).fingerprint() != BASE.fingerprint()


@pytest.mark.parametrize("changes", [{"timestamp": 999}, {"expires": 5}, {"slice_id": 42}])
def test_fingerprint_ignores_what_the_backend_does_not_apply(changes: dict) -> None:
    assert replace(BASE, **changes).fingerprint() == BASE.fingerprint()


def test_fingerprint_is_stable_and_short() -> None:
    again = replace(BASE)
    assert again.fingerprint() == BASE.fingerprint()
    assert len(BASE.fingerprint()) == 32


def test_content_equal_ignores_timestamp_only() -> None:
    assert BASE.content_equal(replace(BASE, timestamp=5))
    assert not BASE.content_equal(replace(BASE, expires=5))
