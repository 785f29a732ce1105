"""The admin keys' pure core: validation of ``accounts``, the delimited block, the hold rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.authority.parse import is_openssh_public_key
from nodemanager.core.adminkeys import (
    BEGIN_LINE,
    END_LINE,
    Hold,
    decide_keys,
    keys_digest,
    parse_accounts,
    render_block,
    split_keys_file,
)

MANAGED = ("root", "site_admin")
K1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyOne000000000000000000000000 admin1@plc"
K2 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQAdminKeyTwo000000000 admin2@plc"
K3 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyThree0000000000000000000000 admin3@plc"
OPERATOR = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKey000000000000000000000000 me@laptop\n"


def parse(value: object, managed: tuple[str, ...] = MANAGED):
    return parse_accounts(value, managed, is_openssh_public_key)


def block(*keys: str) -> bytes:
    return render_block(keys)


# --------------------------------------------------------------------------- parse_accounts


def test_absent_member_says_nothing() -> None:
    statement = parse(None)
    assert statement.wanted == {} and statement.problem == "" and statement.rejections == ()


@pytest.mark.parametrize("value", ["root", 3, {"name": "root"}, b"x"])
def test_member_that_is_not_a_list_says_nothing_and_is_reported(value: object) -> None:
    statement = parse(value)
    assert statement.wanted == {} and "must be an array" in statement.problem


def test_good_entries_and_a_missing_managed_account() -> None:
    statement = parse([{"name": "root", "keys": [K1, K2]}])
    assert statement.wanted == {"root": (K1, K2), "site_admin": ()}


def test_unmanaged_names_are_ignored() -> None:
    statement = parse([{"name": "root", "keys": [K1]}, {"name": "pl_admin", "keys": [K2]}], ("root",))
    assert statement.wanted == {"root": (K1,)} and statement.ignored == ("pl_admin",)


def test_bad_keys_are_dropped_with_reasons_and_the_rest_applies() -> None:
    statement = parse([{"name": "root", "keys": [K1, "not a key", 7, K2 + "\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB evil",
                                                 "command=\"/bin/sh\" " + K3, K3 + " " + BEGIN_LINE]}])
    assert statement.wanted["root"] == (K1,)
    reasons = [r.reason for r in statement.rejections]
    assert len(reasons) == 5
    assert any("not a string" in r for r in reasons) and any("block marker" in r for r in reasons)


def test_surrounding_whitespace_is_removed_and_duplicates_collapse() -> None:
    statement = parse([{"name": "root", "keys": [K1 + "\n", "  " + K1, K1.rsplit(" ", 1)[0] + " other-comment", K2]},
                       {"name": "root", "keys": [K2, K3]}])
    assert statement.wanted["root"] == (K1, K2, K3)


@pytest.mark.parametrize("entry", [
    "root", None, {"keys": [K1]}, {"name": 5, "keys": [K1]},
])
def test_malformed_entries_are_rejected_and_do_not_touch_others(entry: object) -> None:
    statement = parse([entry, {"name": "site_admin", "keys": [K2]}])
    assert statement.wanted["site_admin"] == (K2,)
    assert len(statement.rejections) == 1


@pytest.mark.parametrize("keys", ["ssh-rsa AAAA", None, {"k": 1}, ["garbage", 3]])
def test_a_malformed_entry_says_nothing_about_its_account(keys: object) -> None:
    statement = parse([{"name": "root", "keys": keys}, {"name": "root", "keys": [K1]}])
    assert "root" not in statement.wanted  # neither emptied nor half-applied
    assert statement.wanted["site_admin"] == ()


def test_an_empty_key_list_is_a_statement() -> None:
    assert parse([{"name": "root", "keys": []}]).wanted["root"] == ()


# --------------------------------------------------------------------------- the file


def test_split_without_block() -> None:
    parts = split_keys_file(OPERATOR)
    assert parts.keys is None and parts.before == OPERATOR and parts.after == b""


def test_split_finds_the_block_and_keeps_what_surrounds_it() -> None:
    data = OPERATOR + block(K1, K2) + b"# mine\n" + OPERATOR
    parts = split_keys_file(data)
    assert parts.keys == (K1, K2) and parts.before == OPERATOR and parts.after == b"# mine\n" + OPERATOR


def test_second_block_is_merged_into_the_first() -> None:
    data = block(K1) + OPERATOR + block(K2)
    decision = decide_keys(data, (K3,), None, 2)
    assert decision.content == block(K3) + OPERATOR
    assert set(decision.removed) == {K1, K2}


def test_unterminated_block_leaves_the_file_alone() -> None:
    data = OPERATOR + BEGIN_LINE.encode() + b"\n" + K1.encode() + b"\n" + OPERATOR
    decision = decide_keys(data, (K2,), None, 2)
    assert decision.content is None and "no end marker" in decision.problem


def test_stray_end_marker_is_an_operator_line() -> None:
    data = END_LINE.encode() + b"\n" + OPERATOR
    decision = decide_keys(data, (K1,), None, 2)
    assert decision.content == data + block(K1)


def test_new_file_and_missing_final_newline() -> None:
    assert decide_keys(None, (K1,), None, 2).content == block(K1)
    assert decide_keys(OPERATOR.rstrip(b"\n"), (K1,), None, 2).content == OPERATOR + block(K1)


def test_no_file_and_nothing_wanted_writes_nothing() -> None:
    assert decide_keys(None, (), None, 2).content is None
    assert decide_keys(OPERATOR, (), None, 2).content is None


def test_a_document_saying_nothing_changes_nothing() -> None:
    data = OPERATOR + block(K1)
    decision = decide_keys(data, None, Hold(keys_digest([K1]), 1, 1), 2)
    assert decision.content is None and decision.hold is None and decision.keys == (K1,)


def test_partial_removal_applies_at_once() -> None:
    decision = decide_keys(block(K1, K2), (K2,), None, 2)
    assert decision.content == block(K2) and decision.removed == (K1,) and decision.hold is None


# --------------------------------------------------------------------------- the hold


def test_removing_every_key_is_held_then_confirmed() -> None:
    data = OPERATOR + block(K1, K2)
    first = decide_keys(data, (), None, 2)
    assert first.content is None and first.held_now and first.hold is not None and first.hold.seen == 1
    assert first.hold.count == 2 and first.keys == (K1, K2)
    second = decide_keys(data, (), first.hold, 2)
    assert second.content == OPERATOR + block() and second.hold is None and set(second.removed) == {K1, K2}


def test_confirm_after_three_needs_three_documents() -> None:
    data = block(K1)
    hold = None
    for seen in (1, 2):
        decision = decide_keys(data, (), hold, 3)
        assert decision.content is None and decision.hold is not None and decision.hold.seen == seen
        hold = decision.hold
    assert decide_keys(data, (), hold, 3).content == block()


def test_confirm_after_one_applies_at_once() -> None:
    assert decide_keys(block(K1), (), None, 1).content == block()


def test_a_hold_for_other_keys_starts_over() -> None:
    stale = Hold(keys_digest([K3]), 1, 1)
    decision = decide_keys(block(K1), (), stale, 2)
    assert decision.content is None and decision.hold is not None and decision.hold.seen == 1


def test_a_document_with_keys_clears_the_hold() -> None:
    hold = decide_keys(block(K1), (), None, 2).hold
    decision = decide_keys(block(K1), (K1,), hold, 2)
    assert decision.content is None and decision.hold is None
    assert decide_keys(block(K1), (), decision.hold, 2).content is None  # counting starts over


# --------------------------------------------------------------------------- properties

_text_line = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b""))
_operator_lines = st.lists(_text_line.filter(lambda b: b"# BEGIN nodemanager" not in b
                                              and b"# END nodemanager" not in b), max_size=8)
_keys = st.lists(st.sampled_from([K1, K2, K3]), unique=True, max_size=3).map(tuple)


def _join(lines: list[bytes], final_newline: bool) -> bytes:
    data = b"\n".join(lines)
    return data + b"\n" if lines and final_newline else data


def _outside(data: bytes) -> bytes:
    parts = split_keys_file(data)
    return parts.before + parts.after


@settings(max_examples=300, deadline=None)
@given(_operator_lines, _operator_lines, st.booleans(), _keys, _keys, st.booleans())
def test_operator_bytes_outside_the_block_are_preserved(head: list[bytes], tail: list[bytes], has_block: bool,
                                                         old: tuple[str, ...], new: tuple[str, ...],
                                                         final_newline: bool) -> None:
    before = _join(head, True)
    after = _join(tail, final_newline)
    data = before + (block(*old) if has_block else b"") + after
    decision = decide_keys(data, new, None, 1)
    result = data if decision.content is None else decision.content
    expected = before + after
    if not has_block and new and expected and not expected.endswith(b"\n"):
        expected += b"\n"  # the only change ever made to the operator's bytes
    assert _outside(result) == expected
    assert split_keys_file(result).keys == (new if has_block or new else None)


@settings(max_examples=300, deadline=None)
@given(_operator_lines, st.booleans(), _keys, _keys)
def test_applying_twice_changes_nothing(lines: list[bytes], final_newline: bool, old: tuple[str, ...],
                                        new: tuple[str, ...]) -> None:
    data = _join(lines, final_newline) + (block(*old) if old else b"")
    first = decide_keys(data, new, None, 1)
    result = data if first.content is None else first.content
    again = decide_keys(result, new, None, 1)
    assert again.content is None and again.keys == first.keys


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), _keys)
def test_arbitrary_bytes_never_lose_operator_content(data: bytes, new: tuple[str, ...]) -> None:
    """Whatever is in the file, the result is either no write or a file whose operator part is
    the old operator part (plus at most one newline)."""
    old = split_keys_file(data)
    decision = decide_keys(data, new, None, 2)
    if decision.content is None:
        return
    assert not old.problem
    outside = _outside(decision.content)
    assert outside in (old.before + old.after, old.before + b"\n" + old.after)
    assert split_keys_file(decision.content).keys == new


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=20), st.sampled_from([K1, K2, K3]),
                          st.dictionaries(st.sampled_from(["name", "keys", "x"]),
                                          st.one_of(st.sampled_from(["root", "site_admin", "other"]),
                                                    st.lists(st.one_of(st.sampled_from([K1, K2]), st.text(max_size=8),
                                                                       st.integers()), max_size=4),
                                                    st.integers()))), max_size=6))
def test_parse_never_raises_and_yields_only_valid_keys(value: list[object]) -> None:
    statement = parse(value)
    assert set(statement.wanted) <= set(MANAGED)
    for keys in statement.wanted.values():
        assert all(is_openssh_public_key(key) for key in keys)
        assert len({" ".join(k.split()[:2]) for k in keys}) == len(keys)


_pieces = st.lists(st.sampled_from([BEGIN_LINE.encode() + b"\n", END_LINE.encode() + b"\n", b"  " + BEGIN_LINE.encode(),
                                    OPERATOR, b"# a comment\n", b"\n", K1.encode() + b"\n", K2.encode() + b"\r\n",
                                    b"no newline at the end"]), max_size=12)


@settings(max_examples=500, deadline=None)
@given(_pieces, _keys, st.booleans())
def test_markers_anywhere_never_lose_operator_lines(pieces: list[bytes], new: tuple[str, ...], removal: bool) -> None:
    """Second blocks, stray end markers, unterminated blocks, markers without newlines: either the
    file is left alone (an unterminated block always is) or everything outside every block is kept
    and exactly one block holds the new keys."""
    data = b"".join(pieces)
    old = split_keys_file(data)
    wanted = () if removal else new
    decision = decide_keys(data, wanted, None, 1)
    if old.problem:
        assert decision.content is None and decision.problem
        return
    if decision.content is None:
        return
    after = split_keys_file(decision.content)
    assert after.blocks == 1 and after.keys == wanted and not after.problem
    assert after.before + after.after in (old.before + old.after, old.before + b"\n" + old.after)
    assert decide_keys(decision.content, wanted, None, 1).content is None
