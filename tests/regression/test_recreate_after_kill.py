"""Regression: a daemon killed between re-creating a vanished account (useradd) and recording its
uid must not, at the next cycle, take its own new account for one replaced by someone else.

Found by tests/integration/test_daemon_crash.py ("account was replaced by someone else (uid
changed)" after kill -9), when useradd handed out the next free uid. The fix forgets the vanished
account's uid before useradd. Since uids derive from the slice id the re-created account gets the
same uid again; the adoption after the crash must hold all the same.
"""

from __future__ import annotations

from pathlib import Path

from nodemanager.backends.hollow import HollowBackend
from nodemanager.core.records import Phase
from nodemanager.operations import SliverOperations
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.fakeauthority import make_sliver


class DiesAfterCreate(HollowBackend):
    """The hollow backend whose process 'dies' right after creating an account."""

    die = False

    def create(self, sliver):  # noqa: ANN001, ANN201
        uid = super().create(sliver)
        if self.die:
            raise SystemExit("killed after useradd")
        return uid


def test_recreated_account_is_adopted_after_a_crash(tmp_path: Path) -> None:
    store = Store(tmp_path / "nm.sqlite")
    backend = DiesAfterCreate()
    ops = SliverOperations(store, backend, ManualClock())
    sliver = make_sliver("site_alpha")
    store.apply_records([sliver], [], None)
    ops.ensure(sliver, start=True)
    old_uid = store.account("site_alpha").uid
    backend.destroy("site_alpha")  # the account vanishes (drift)
    backend.die = True
    try:
        ops.ensure(sliver, start=False)  # re-creation, then the "kill"
    except SystemExit:
        pass
    new_uid = backend.observe()["site_alpha"].uid
    assert new_uid == old_uid  # uid_base + slice id: the same slice, the same uid
    backend.die = False
    ops.ensure(sliver, start=False)  # the next cycle
    state = store.account("site_alpha")
    assert state.owned and state.uid == new_uid and state.phase is Phase.STOPPED
    store.close()
