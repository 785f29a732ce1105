"""The pure part of blocking queries: the waiter registry, the wire rules, the document index."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.errors import InvalidArgument
from nodemanager.plc.documents import Snapshot, document_index, getslivers_answer
from nodemanager.plc.model import load_authority_text, relative_expiry
from nodemanager.plc.waits import (
    INDEX_PATTERN,
    MAX_WAIT,
    MIN_WAIT,
    Waiter,
    WaitRegistry,
    changed_nodes,
    checked_index,
    clamped_wait,
    jittered_wait,
    wait_from_query,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"


# --------------------------------------------------------------------------- the registry
def test_a_node_has_one_waiter_and_a_new_one_supersedes_it() -> None:
    registry = WaitRegistry()
    first, second = Waiter(1, "a", 10.0, "t1"), Waiter(1, "a", 20.0, "t2")
    assert registry.add(first) is None
    assert registry.add(second) is first and first.done and not second.done
    assert len(registry) == 1 and second in registry and first not in registry
    assert registry.expired(15.0) == []  # the superseded one is not reported again
    assert registry.expired(20.0) == [second] and len(registry) == 0


def test_a_change_wakes_only_the_nodes_whose_index_moved() -> None:
    registry = WaitRegistry()
    waiters = {n: Waiter(n, f"i{n}", 100.0) for n in (1, 2, 3)}
    for waiter in waiters.values():
        registry.add(waiter)
    woken = registry.changed({1: "i1", 2: "NEW", 3: "i3"})
    assert woken == [waiters[2]] and waiters[2].done and len(registry) == 2
    assert registry.changed({1: "i1"}) == [waiters[3]]  # node 3 vanished: its waiter is answered
    assert registry.changed({1: "other"}, nodes=[2, 3]) == []  # limited to the nodes given
    assert registry.changed({1: "other"}, nodes=[1]) == [waiters[1]] and len(registry) == 0


def test_expiry_is_by_deadline_and_next_deadline_skips_the_gone() -> None:
    registry = WaitRegistry()
    a, b, c = Waiter(1, "x", 5.0), Waiter(2, "x", 3.0), Waiter(3, "x", 9.0)
    for waiter in (a, b, c):
        registry.add(waiter)
    assert registry.next_deadline() == 3.0
    assert registry.remove(b) and not registry.remove(b)  # idempotent
    assert registry.next_deadline() == 5.0
    assert registry.expired(4.9) == [] and registry.expired(6.0) == [a]
    assert registry.next_deadline() == 9.0 and registry.expired(100.0) == [c]
    assert registry.next_deadline() is None


def test_a_let_go_waiter_cannot_wait_again() -> None:
    registry = WaitRegistry()
    waiter = Waiter(1, "x", 1.0)
    registry.add(waiter)
    registry.remove(waiter)
    with pytest.raises(ValueError):
        registry.add(waiter)


def test_superseding_many_times_keeps_the_heap_small() -> None:
    registry = WaitRegistry()
    for n in range(10_000):
        registry.add(Waiter(7, "x", float(n)))
    assert len(registry) == 1 and len(registry._heap) <= 200


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 5), st.sampled_from("abc"), st.floats(0, 100)),
        st.tuples(st.just("change"), st.dictionaries(st.integers(1, 5), st.sampled_from("abc"))),
        st.tuples(st.just("expire"), st.floats(0, 100)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_every_waiter_is_let_go_exactly_once(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Whatever happens, each added waiter ends exactly once: superseded, woken or expired, and
    a woken one's node index really differed; at the end everything left expires."""
    registry = WaitRegistry()
    added: list[Waiter] = []
    ended: list[Waiter] = []
    for op in ops:
        if op[0] == "add":
            waiter = Waiter(op[1], op[2], op[3])
            added.append(waiter)
            previous = registry.add(waiter)
            if previous is not None:
                ended.append(previous)
        elif op[0] == "change":
            woken = registry.changed(op[1])
            assert all(op[1].get(w.node_id) != w.index for w in woken)
            ended += woken
        else:
            expired = registry.expired(op[1])
            assert all(w.deadline <= op[1] for w in expired)
            ended += expired
        assert len({w.node_id for w in added if w in registry}) == len(registry)
    ended += registry.expired(float("inf"))
    assert sorted(map(id, ended)) == sorted(map(id, added)) and all(w.done for w in added)


def test_changed_nodes() -> None:
    assert changed_nodes({1: "a", 2: "b", 3: "c"}, {1: "a", 2: "B", 4: "d"}) == {2, 3, 4}


# --------------------------------------------------------------------------- wire rules
@given(st.integers(-10**6, 10**6))
def test_wait_is_clamped(value: int) -> None:
    assert clamped_wait(value) == max(MIN_WAIT, min(MAX_WAIT, value))


@pytest.mark.parametrize("value", [True, 1.5, "30", None, [30]])
def test_wait_must_be_an_int(value: object) -> None:
    with pytest.raises(InvalidArgument):
        clamped_wait(value)


def test_wait_from_the_query() -> None:
    assert wait_from_query("30") == 30 and wait_from_query("0") == 1 and wait_from_query("99999") == 600
    for bad in ("", "-1", "1.5", "x", "1" * 10, "٣"):
        with pytest.raises(InvalidArgument):
            wait_from_query(bad)


@given(st.integers(MIN_WAIT, MAX_WAIT), st.floats(0, 1))
def test_the_jitter_stays_in_the_last_sixteenth(wait: int, fraction: float) -> None:
    used = jittered_wait(wait, fraction)
    assert wait - wait / 16 <= used <= wait


def test_the_jitter_ends_of_the_range() -> None:
    assert jittered_wait(160, 0.0) == 160 and jittered_wait(160, 1.0) == 150
    with pytest.raises(ValueError):
        jittered_wait(160, 1.5)


@pytest.mark.parametrize("value", ["", "a" * 65, "a b", "é", "a/b", 5, None])
def test_bad_indexes(value: object) -> None:
    with pytest.raises(InvalidArgument):
        checked_index(value)


def test_good_indexes() -> None:
    assert checked_index("a" * 64) == "a" * 64 and checked_index("Az09_-") == "Az09_-"


# --------------------------------------------------------------------------- the document index
DATA = f"""
[[nodes]]
id = 1
key = "k1"
[[nodes]]
id = 2
key = "k2"
[[nodes]]
id = 5
key = "k5"
[[slices]]
name = "site_all"
id = 1
keys = ["{KEY}"]
[[slices]]
name = "site_five"
id = 2
nodes = [5]
expires = "+7d"
"""


def snapshot(text: str, mtime: int, timestamp: int | None = None) -> Snapshot:
    data = load_authority_text(text, timestamp=timestamp or mtime, base_time=mtime, origin="t.toml")
    return Snapshot.of(data)


def test_the_index_ignores_the_timestamp_and_follows_the_content() -> None:
    one = snapshot(DATA, 1_700_000_000)
    later = snapshot(DATA, 1_700_000_100, timestamp=1_700_000_500)
    assert later.data.timestamp != one.data.timestamp and later.indexes == one.indexes
    assert all(INDEX_PATTERN.fullmatch(index) and len(index) == 22 for index in one.indexes.values())
    assert len(set(one.indexes.values())) == 3  # per-node documents differ (node_id at least)
    answer = getslivers_answer(one.data, 5)
    assert answer["nm_index"] == one.indexes[5] == document_index(answer)


def test_an_edit_for_node_5_changes_only_node_5s_index() -> None:
    """Relative expiries are rounded up to a whole day: editing the file later the same day
    leaves the other nodes' documents -- and indexes -- as they were."""
    day = 1_700_006_400 - 1_700_006_400 % 86400
    before = snapshot(DATA, day + 3600)
    after = snapshot(DATA.replace("nodes = [5]\n", 'nodes = [5]\nkeys = ["' + KEY + '"]\n'), day + 7200)
    assert changed_nodes(before.indexes, after.indexes) == {5}
    slivers = {s["name"]: s["expires"] for s in getslivers_answer(after.data, 1)["slivers"]}
    assert slivers == {"site_all": relative_expiry(day + 7200, 30 * 86400)} == {"site_all": day + 31 * 86400}


@given(st.integers(0, 2**31 - 10**7), st.integers(1, 10**7))
def test_a_relative_expiry_is_never_early_and_at_most_a_step_late(base: int, seconds: int) -> None:
    step = 86400 if seconds >= 86400 else 3600
    expires = relative_expiry(base, seconds)
    assert base + seconds <= expires < base + seconds + step and expires % step == 0


def test_index_pattern_is_the_wire_rule() -> None:
    assert INDEX_PATTERN.pattern == re.compile(r"[A-Za-z0-9_-]{1,64}").pattern


RICH = f"""
[[nodes]]
id = 1
key = "k1"
hostname = "one.example.org"
bwcap = 5000
reservation_policy = "lease_or_idle"
lease_granularity = 60
[[nodes.leases]]
slice = "site_all"
t_from = "+1h"
t_until = "+2h"
[[nodes]]
id = 2
key = "k2"
[[conf_files]]
source = "motd"
dest = "/etc/nm/motd"
nodes = [2]
[[slices]]
name = "site_all"
id = 1
keys = ["{KEY}"]
initscript = "echo <&> ünïcode"
[slices.attributes]
vsys = ["a", "b"]
[[slices]]
name = "site_ctrl"
id = 2
instantiation = "nm-controller"
[[slices]]
name = "site_deleg"
id = 3
instantiation = "delegated"
controller = "site_ctrl"
nodes = [2]
"""


@pytest.mark.parametrize("text", [DATA, RICH], ids=["plain", "rich"])
def test_the_snapshot_shortcuts_give_the_plain_answers(text: str) -> None:
    """Snapshot.of hashes each slice once and getslivers_body splices marshalled slivers: both
    must give exactly what the plain struct gives."""
    import xmlrpc.client

    from nodemanager.plc.model import getslivers_struct

    one = snapshot(text, 1_700_000_000)
    for node_id in one.data.nodes:
        assert one.indexes[node_id] == document_index(getslivers_struct(one.data, node_id))
        body = one.getslivers_body(node_id)
        assert xmlrpc.client.loads(body, use_builtin_types=True)[0][0] == getslivers_answer(one.data, node_id)
        assert one.getslivers_body(node_id) == body  # from the cache now
