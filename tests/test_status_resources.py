"""``status --resources`` names what it ignores: an unparsable ``cpu_cores`` tag (resources.md:
unparsable values take the default) is shown with its reason, never silently dropped."""

from __future__ import annotations

from pathlib import Path

from nodemanager.enforce.set import EnforcementSet
from nodemanager.status import render_resources
from nodemanager.store import Store
from nodemanager.testing.fakeauthority import make_sliver


def test_an_unparsable_cpu_cores_tag_is_shown_with_its_reason(tmp_path: Path) -> None:
    with Store(tmp_path / "nm.sqlite") as store:
        good = make_sliver("site_good", attributes=(("cpu_cores", "1b"),))
        bad = make_sliver("site_bad", attributes=(("cpu_cores", "two"),))
        store.apply_records([good, bad], [], {})
        text = render_resources(store, EnforcementSet([]))
    ignored = [line for line in text.splitlines() if "IGNORED" in line]
    assert len(ignored) == 1 and "site_bad" in ignored[0] and "'two'" in ignored[0]
