"""The Backend contract against both backends: hollow always, account as root.

The account backend uses the account prefix ``nmt``, a root-owned 0755 home root, a private keys
directory, sliver group and uid base (``testing.accounts``). Each test
destroys what it made; in addition every account named ``nmtct_...`` (the contract's sliver names)
carrying the node manager's GECOS marker is removed at the end of the module, even after a failure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.backends.account import MANAGED_GECOS, AccountBackend
from nodemanager.backends.hollow import HollowBackend
from nodemanager.host import Host
from nodemanager.testing.accounts import private_keys_dir, removed_group, uid_base_for_tests
from nodemanager.testing.backend_contract import BackendContract

PREFIX = "nmt"
#: The contract names its slivers ``ct_...``: the sweep stays clear of other tests' ``nmt`` accounts.
ACCOUNT_PATTERN = PREFIX + "ct_"


class TestHollowContract(BackendContract):
    def make_backend(self) -> HollowBackend:
        return HollowBackend()

    def applied_keys(self, backend: HollowBackend, name: str) -> tuple[str, ...]:
        account = backend.account(name)
        assert account is not None
        return account.keys

    def applied_state(self, backend: HollowBackend, name: str) -> object:
        account = backend.account(name)
        assert account is not None
        return account.version


def _remove_test_accounts() -> None:
    host = Host()
    for entry in host.all_users():
        if entry.name.startswith(ACCOUNT_PATTERN) and entry.gecos == MANAGED_GECOS and entry.uid != 0:
            for pid in host.pids_of_uid(entry.uid):
                host.kill(pid, 9)
            subprocess.run(["userdel", "--remove", entry.name], capture_output=True, check=False)
            subprocess.run(["groupdel", entry.name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def account_cleanup() -> Iterator[tuple[Path, str]]:
    """A private keys directory and sliver group for the module; the accounts, then both, removed."""
    with private_keys_dir() as keys_dir, removed_group(f"{PREFIX}ct{os.getpid() % 100000}") as group:
        try:
            yield keys_dir, group
        finally:
            if os.geteuid() == 0:
                _remove_test_accounts()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the account backend needs root")
class TestAccountContract(BackendContract):
    @pytest.fixture(autouse=True)
    def _homes(self, home_root: Path, account_cleanup: tuple[Path, str]) -> None:
        self.home_root = home_root
        self.keys_dir, self.group = account_cleanup

    def make_backend(self) -> AccountBackend:
        return AccountBackend(Host(), home_root=self.home_root, shell="/bin/sh", name_prefix=PREFIX, stop_grace=2.0,
                              uid_base=uid_base_for_tests(), keys_dir=self.keys_dir, group=self.group)

    def applied_keys(self, backend: AccountBackend, name: str) -> tuple[str, ...]:
        text = (backend.keys_dir / backend.account_name(name)).read_text()
        return tuple(text.splitlines())

    def applied_state(self, backend: AccountBackend, name: str) -> object:
        info = (backend.keys_dir / backend.account_name(name)).stat()
        return (info.st_ino, info.st_mtime_ns)
