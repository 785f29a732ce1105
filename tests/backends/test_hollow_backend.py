"""HollowBackend: records only, counts calls, thread-safe, announces itself, touches no OS."""

from __future__ import annotations

import ast
import logging
import threading
from pathlib import Path

import pytest

import nodemanager.backends.hollow as hollow_module
from nodemanager.backends.hollow import FIRST_UID, HollowBackend
from nodemanager.core.errors import AccountConflict, BackendError
from nodemanager.core.records import PLC_INSTANTIATED, Sliver


def make_sliver(name: str = "pl_test", **changes: object) -> Sliver:
    fields: dict[str, object] = dict(name=name, slice_id=1, instantiation=PLC_INSTANTIATED, expires=2**31 - 1,
                                     timestamp=1, keys=("ssh-rsa K a@b",))
    fields.update(changes)
    return Sliver(**fields)  # type: ignore[arg-type]


def test_announces_itself_at_construction(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodemanager.backends.hollow"):
        backend = HollowBackend()
    assert backend.kind == "hollow"
    assert "hollow backend: records only, no accounts are created" in caplog.text
    assert "records only" in (hollow_module.__doc__ or "")


def test_uid_is_uid_base_plus_slice_id_and_never_shared() -> None:
    assert HollowBackend().create(make_sliver("pl_a", slice_id=3)) == FIRST_UID + 3
    backend = HollowBackend(uid_base=200000)
    assert backend.create(make_sliver("pl_a", slice_id=7)) == 200007
    with pytest.raises(AccountConflict, match="uid 200007"):
        backend.create(make_sliver("pl_b", slice_id=7))
    backend.destroy("pl_a")
    assert backend.create(make_sliver("pl_a", slice_id=7)) == 200007


def test_module_imports_nothing_that_reaches_the_os() -> None:
    tree = ast.parse(Path(hollow_module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not imported & {"os", "subprocess", "pwd", "grp", "shutil", "socket"}


def test_calls_are_counted_per_method() -> None:
    backend = HollowBackend()
    sliver = make_sliver()
    backend.create(sliver)
    backend.configure(sliver, {})
    backend.configure(sliver, {})
    backend.observe()
    assert backend.calls == {"create": 1, "configure": 2, "observe": 1}


def test_configure_records_and_versions_only_real_changes() -> None:
    backend = HollowBackend()
    sliver = make_sliver(initscript="echo")
    backend.create(sliver)
    backend.configure(sliver, {"nm_enabled": 1})
    account = backend.account("pl_test")
    assert account is not None and (account.keys, account.initscript, account.enabled) == (("ssh-rsa K a@b",), "echo", True)
    backend.configure(sliver, {"nm_enabled": 1})
    assert backend.account("pl_test") == account
    backend.configure(sliver, {"nm_enabled": 0})
    disabled = backend.account("pl_test")
    assert disabled is not None and disabled.keys == () and not disabled.enabled and disabled.version > account.version


def test_errors_name_the_sliver() -> None:
    backend = HollowBackend()
    backend.create(make_sliver())
    with pytest.raises(AccountConflict, match="pl_test"):
        backend.create(make_sliver())
    with pytest.raises(BackendError, match="pl_other"):
        backend.start(make_sliver("pl_other"))


def test_concurrent_creates_get_distinct_uids() -> None:
    backend = HollowBackend()
    uids: list[int] = []
    lock = threading.Lock()

    def work(start: int) -> None:
        for i in range(start, start + 50):
            uid = backend.create(make_sliver(f"pl_s{i}", slice_id=i))
            with lock:
                uids.append(uid)

    threads = [threading.Thread(target=work, args=(n * 50,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(uids)) == 400 and len(backend.observe()) == 400
    assert backend.calls["create"] == 400
