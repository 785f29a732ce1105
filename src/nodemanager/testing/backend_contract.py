"""The Backend contract suite: one set of tests every backend must pass.

Use it by subclassing in a test module (pytest collects the ``Test*`` subclass, not this base)::

    class TestHollowContract(BackendContract):
        def make_backend(self):
            return HollowBackend()

        def applied_keys(self, backend, name):
            return backend.account(name).keys

        def applied_state(self, backend, name):
            return backend.account(name).version

``applied_state`` returns any value that changes whenever the backend rewrites the sliver's
configuration (a version, a file's inode and mtime): the idempotence test asserts that configuring
twice with the same input leaves it unchanged. The ``backend`` fixture destroys every sliver the
test created, even when the test fails. Only the test process imports this module (it needs
pytest).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from ..backends.base import Backend
from ..core.errors import AccountConflict, BackendError
from ..core.records import PLC_INSTANTIATED, Sliver
from .accounts import wait_for

KEYS = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIContractKeyOne one@example", "ssh-rsa AAAAB3Contract two@example")
#: Keeps the sliver busy until stopped; a plain POSIX shell script, runnable by any account.
SLEEPER = "#!/bin/sh\nexec sleep 120\n"
_counter = itertools.count()


class BackendContract:
    """Backend behaviour common to every implementation (see ``backends/base.py``)."""

    def make_backend(self) -> Backend:
        raise NotImplementedError

    def applied_keys(self, backend: Any, name: str) -> tuple[str, ...]:
        """The keys the backend currently applies for ``name`` (e.g. authorized_keys lines)."""
        raise NotImplementedError

    def applied_state(self, backend: Any, name: str) -> object:
        """A value that changes whenever the sliver's configuration is rewritten."""
        raise NotImplementedError

    # --- fixtures and helpers -------------------------------------------------------------
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        backend = self.make_backend()
        self._made: list[str] = []
        yield backend
        for name in self._made:
            try:
                backend.destroy(name)
            except BackendError:
                pass

    def sliver(self, name: str | None = None, **changes: Any) -> Sliver:
        """A sliver of a slice of its own (name and slice id from one counter), unless given."""
        serial = next(_counter)
        if name is None:
            name = f"ct_{os.getpid() % 10000}x{serial}"
            self._made.append(name)
        else:
            serial = int(name.rpartition("x")[2]) if name.rpartition("x")[2].isdigit() else serial
        fields: dict[str, Any] = dict(
            name=name, slice_id=100 + serial, instantiation=PLC_INSTANTIATED, expires=2**31 - 1, timestamp=1, keys=KEYS
        )
        fields.update(changes)
        return Sliver(**fields)

    # --- the contract ---------------------------------------------------------------------
    def test_kind_is_named(self, backend: Backend) -> None:
        assert backend.kind in ("account", "hollow")

    def test_create_returns_uid_and_observe_lists_it(self, backend: Backend) -> None:
        sliver = self.sliver()
        uid = backend.create(sliver)
        assert isinstance(uid, int) and uid > 0
        observed = backend.observe()
        assert sliver.name in observed
        assert observed[sliver.name].uid == uid
        assert observed[sliver.name].managed_marker
        found = backend.lookup(sliver.name)
        assert found is not None and found.uid == uid

    def test_uid_is_uid_base_plus_slice_id_and_never_shared(self, backend: Backend) -> None:
        first = self.sliver()
        uid = backend.create(first)
        assert uid == backend.uid_base + first.slice_id  # type: ignore[attr-defined]
        twin = self.sliver(slice_id=first.slice_id)
        with pytest.raises(AccountConflict, match=rf"{twin.name}.*uid {uid}"):
            backend.create(twin)
        assert twin.name not in backend.observe()
        backend.destroy(first.name)
        assert backend.create(twin) == uid  # the slice's number, free again

    def test_configure_returns_the_signature_observe_reports(self, backend: Backend) -> None:
        sliver = self.sliver()
        backend.create(sliver)
        access = backend.configure(sliver, {})
        assert isinstance(access, str)
        assert backend.observe()[sliver.name].access == access
        found = backend.lookup(sliver.name)
        assert found is not None and found.access == access
        assert backend.configure(sliver, {}) == access  # nothing changed: the same signature

    def test_create_twice_conflicts(self, backend: Backend) -> None:
        sliver = self.sliver()
        uid = backend.create(sliver)
        with pytest.raises(AccountConflict, match=sliver.name):
            backend.create(sliver)
        assert backend.observe()[sliver.name].uid == uid

    def test_configure_applies_keys(self, backend: Backend) -> None:
        sliver = self.sliver()
        backend.create(sliver)
        backend.configure(sliver, {"nm_enabled": 1})
        assert self.applied_keys(backend, sliver.name) == KEYS
        changed = self.sliver(sliver.name, keys=KEYS[:1])
        backend.configure(changed, {"nm_enabled": 1})
        assert self.applied_keys(backend, sliver.name) == KEYS[:1]

    def test_configure_twice_is_idempotent(self, backend: Backend) -> None:
        sliver = self.sliver()
        backend.create(sliver)
        backend.configure(sliver, {})
        first = self.applied_state(backend, sliver.name)
        backend.configure(sliver, {})
        assert self.applied_state(backend, sliver.name) == first
        assert self.applied_keys(backend, sliver.name) == KEYS

    def test_configure_of_missing_account_names_the_sliver(self, backend: Backend) -> None:
        sliver = self.sliver()
        with pytest.raises(BackendError, match=sliver.name):
            backend.configure(sliver, {})

    def test_destroy_removes_and_is_idempotent(self, backend: Backend) -> None:
        sliver = self.sliver()
        backend.create(sliver)
        backend.destroy(sliver.name)
        assert sliver.name not in backend.observe()
        assert backend.lookup(sliver.name) is None
        backend.destroy(sliver.name)
        assert sliver.name not in backend.observe()

    def test_destroyed_sliver_can_be_created_again(self, backend: Backend) -> None:
        sliver = self.sliver()
        backend.create(sliver)
        backend.destroy(sliver.name)
        uid = backend.create(sliver)
        assert backend.observe()[sliver.name].uid == uid

    def test_start_then_running_then_stop(self, backend: Backend) -> None:
        sliver = self.sliver(initscript=SLEEPER)
        backend.create(sliver)
        backend.configure(sliver, {})
        assert not backend.is_running(sliver.name)
        backend.start(sliver)
        assert wait_for(lambda: backend.is_running(sliver.name))
        backend.stop(sliver.name)
        assert not backend.is_running(sliver.name)
        backend.stop(sliver.name)
        assert not backend.is_running(sliver.name)

    def test_stop_and_is_running_of_absent_sliver(self, backend: Backend) -> None:
        sliver = self.sliver()
        backend.stop(sliver.name)
        assert backend.is_running(sliver.name) is False

    def test_disabled_sliver_has_no_keys_and_does_not_start(self, backend: Backend) -> None:
        sliver = self.sliver(initscript=SLEEPER)
        backend.create(sliver)
        backend.configure(sliver, {"nm_enabled": 1})
        backend.start(sliver)
        assert wait_for(lambda: backend.is_running(sliver.name))
        backend.configure(sliver, {"nm_enabled": 0})
        assert self.applied_keys(backend, sliver.name) == ()
        assert not backend.is_running(sliver.name)
        backend.start(sliver)
        assert not wait_for(lambda: backend.is_running(sliver.name), timeout=0.5)
        backend.configure(sliver, {"nm_enabled": 1})
        assert self.applied_keys(backend, sliver.name) == KEYS
