"""The bundled authority serves ``reservation_policy``, ``lease_granularity`` and ``leases`` per
node from its data file (docs/leases.md), and the node's parser hands them to the lease handler."""

from __future__ import annotations

import pytest

from nodemanager.authority.parse import parse_getslivers_with_protection
from nodemanager.core.errors import ConfigError
from nodemanager.core.leases import schedule_from_members
from nodemanager.plc.model import getslivers_struct, load_authority_text

DATA = """
[[nodes]]
id = 1
key = "k1"
reservation_policy = "lease_or_idle"
lease_granularity = 60
[[nodes.leases]]
slice = "site_alpha"
t_from = "+1h"
t_until = 1015200
[[nodes]]
id = 2
key = "k2"
[[slices]]
name = "site_alpha"
id = 101
"""


def load(text: str = DATA):  # type: ignore[no-untyped-def]
    return load_authority_text(text, timestamp=1000, base_time=1_008_000, origin="test.toml")


def test_a_reservable_node_gets_the_members_and_a_regular_one_none() -> None:
    data = load()
    document = getslivers_struct(data, 1)
    assert document["reservation_policy"] == "lease_or_idle" and document["lease_granularity"] == 60
    assert document["leases"] == [{"slice_id": 101, "name": "site_alpha", "t_from": 1_011_600, "t_until": 1_015_200}]
    assert "leases" not in getslivers_struct(data, 2) and "reservation_policy" not in getslivers_struct(data, 2)


def test_the_node_reads_what_the_authority_serves() -> None:
    data = load(DATA.replace("t_until = 1015200", 't_until = "+2h"'))
    parsed, _ = parse_getslivers_with_protection(getslivers_struct(data, 1), expected_node_id=1)
    schedule, problems = schedule_from_members(parsed.members)
    assert problems == [] and [(l.name, l.t_from, l.t_until) for l in schedule.leases] == [
        ("site_alpha", 1_011_600, 1_015_200)]


@pytest.mark.parametrize(("change", "where"), [
    (('reservation_policy = "lease_or_idle"', 'reservation_policy = "sometimes"'), "reservation_policy"),
    (('slice = "site_alpha"', 'slice = "site_nope"'), "leases[0].slice"),
    (("t_until = 1015200", "t_until = 1011600"), "leases[0].t_until"),
    (("lease_granularity = 60", "lease_granularity = 0"), "lease_granularity"),
])
def test_bad_lease_fields_are_refused_naming_the_field(change: tuple[str, str], where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        load(DATA.replace(*change))
