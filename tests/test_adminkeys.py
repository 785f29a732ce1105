"""The ``admin_keys`` handler over ``FakeHost``, and through ``daemon.build_node`` with a ``file://``
document carrying ``accounts`` (no root needed: the account backend runs over ``FakeHost``).

The same handler against real accounts, links and a real sshd: ``tests/integration/test_admin_keys.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.adminkeys import AdminKeys, load_outcomes, status_lines
from nodemanager.config import parse_config
from nodemanager.core.adminkeys import render_block, split_keys_file
from nodemanager.core.records import AuthorityDocument
from nodemanager.daemon import build_node
from nodemanager.datadir import Meta
from nodemanager.documenthandlers import document_handlers_from_config
from nodemanager.status import render_status
from nodemanager.store import Store
from nodemanager.testing.fakehost import FakeHost

K1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyOne000000000000000000000000 admin1@plc"
K2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyTwo000000000000000000000000 admin2@plc"
MINE = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKey000000000000000000000000 me@laptop\n"
ADMIN_KEYS = Path("/home/site_admin/.ssh/authorized_keys")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "nm.sqlite")
    store.open()
    yield store
    store.close()


@pytest.fixture
def host() -> FakeHost:
    host = FakeHost()
    entry = host.add_user("site_admin", 1200)
    host.makedirs_owned(Path(entry.home), 1200, 1200, 0o755)
    return host


def doc(accounts: object, timestamp: int = 100) -> AuthorityDocument:
    members = {} if accounts is None else {"accounts": accounts}
    return AuthorityDocument(timestamp=timestamp, node_id=1, slivers=(), members=members)


def handler(host: FakeHost, store: Store, *names: str) -> AdminKeys:
    return AdminKeys(host, store, names or ("site_admin",), confirm_after=2, now=lambda: 1_700_000_000.0)


def test_keys_are_written_in_a_block_owned_by_the_account(host: FakeHost, store: Store) -> None:
    handler(host, store).apply(doc([{"name": "site_admin", "keys": [K1]}]))
    written = host.files[ADMIN_KEYS]
    assert written.data == render_block([K1]) and (written.uid, written.gid, written.mode) == (1200, 1200, 0o600)
    assert host.dirs[ADMIN_KEYS.parent] == (1200, 1200, 0o700)
    outcome = load_outcomes(store.get_meta(Meta.ADMIN_KEYS))["site_admin"]
    assert outcome.keys == 1 and outcome.changed_at == 1_700_000_000.0 and outcome.document == 100


def test_operator_lines_and_mode_are_kept_and_unchanged_files_not_rewritten(host: FakeHost, store: Store) -> None:
    host.makedirs_owned(ADMIN_KEYS.parent, 1200, 1200, 0o700)
    host.add_file(ADMIN_KEYS, MINE, uid=1200, gid=1300, mode=0o664)
    keys = handler(host, store)
    keys.apply(doc([{"name": "site_admin", "keys": [K1, K2]}]))
    written = host.files[ADMIN_KEYS]
    assert written.data == MINE + render_block([K1, K2]) and (written.gid, written.mode) == (1300, 0o644)
    writes = len(host.method_calls("atomic_write"))
    keys.apply(doc([{"name": "site_admin", "keys": [K1, K2]}], 200))
    assert len(host.method_calls("atomic_write")) == writes


def test_missing_account_is_reported_not_created(host: FakeHost, store: Store) -> None:
    handler(host, store, "nobody_here").apply(doc([{"name": "nobody_here", "keys": [K1]}]))
    assert "nobody_here" not in host.users and not host.commands
    problem = load_outcomes(store.get_meta(Meta.ADMIN_KEYS))["nobody_here"].problem
    assert problem == "account nobody_here does not exist (it is never created)"
    assert "ADMIN KEYS:     nobody_here: account nobody_here does not exist" in render_status(store)


@pytest.mark.parametrize("accounts", [None, [], [{"name": "site_admin", "keys": []}], "garbage",
                                      [{"name": "site_admin", "keys": "x"}], [{"name": "site_admin", "keys": ["bad"]}]])
def test_nothing_said_or_everything_removed_never_empties_the_block_at_once(
        host: FakeHost, store: Store, accounts: object) -> None:
    keys = handler(host, store)
    keys.apply(doc([{"name": "site_admin", "keys": [K1]}]))
    keys.apply(doc(accounts, 200))
    assert split_keys_file(host.files[ADMIN_KEYS].data).keys == (K1,)


def test_removal_of_every_key_is_held_then_confirmed(host: FakeHost, store: Store) -> None:
    keys = handler(host, store)
    keys.apply(doc([{"name": "site_admin", "keys": [K1, K2]}]))
    keys.apply(doc([], 200))
    held = load_outcomes(store.get_meta(Meta.ADMIN_KEYS))["site_admin"].hold
    assert held is not None and (held.count, held.seen) == (2, 1)
    assert "removal of all 2 key(s) HELD (seen in 1 of 2 consecutive documents needed)" in render_status(store)
    assert split_keys_file(host.files[ADMIN_KEYS].data).keys == (K1, K2)
    keys.apply(doc([], 300))
    assert split_keys_file(host.files[ADMIN_KEYS].data).keys == ()
    assert load_outcomes(store.get_meta(Meta.ADMIN_KEYS))["site_admin"].hold is None


def test_a_document_without_accounts_breaks_the_confirmation(host: FakeHost, store: Store) -> None:
    keys = handler(host, store)
    keys.apply(doc([{"name": "site_admin", "keys": [K1]}]))
    keys.apply(doc([], 200))
    keys.apply(doc(None, 300))
    keys.apply(doc([], 400))
    assert split_keys_file(host.files[ADMIN_KEYS].data).keys == (K1,)


def test_links_and_foreign_files_are_reported_and_left_alone(host: FakeHost, store: Store) -> None:
    host.makedirs_owned(ADMIN_KEYS.parent, 1200, 1200, 0o700)
    host.add_file(ADMIN_KEYS, b"root:secret\n", uid=0, gid=0, mode=0o600)  # a hard link to /etc/shadow, say
    handler(host, store).apply(doc([{"name": "site_admin", "keys": [K1]}]))
    assert host.files[ADMIN_KEYS].data == b"root:secret\n" and not host.method_calls("atomic_write")
    assert "belongs to uid 0, not to site_admin" in load_outcomes(store.get_meta(Meta.ADMIN_KEYS))["site_admin"].problem


def test_rejections_are_shown_per_account(host: FakeHost, store: Store) -> None:
    handler(host, store).apply(doc([{"name": "site_admin", "keys": [K1, "no key"]}, {"name": "other", "keys": []}]))
    assert split_keys_file(host.files[ADMIN_KEYS].data).keys == (K1,)
    text = "\n".join(status_lines(store.get_meta(Meta.ADMIN_KEYS), lambda t: "then"))
    assert "1 key(s) in the block, last changed then" in text and "not a one-line OpenSSH public key" in text


def test_metrics_show_each_managed_account(host: FakeHost, store: Store) -> None:
    from nodemanager.metrics import NodeMetrics

    handler(host, store, "site_admin", "ghost").apply(doc([{"name": "site_admin", "keys": [K1, K2]}]))
    text = NodeMetrics(store=store, queue_depth=None, backend="account").render().decode()
    assert 'nodemanager_admin_keys{account="site_admin"} 2.0' in text
    assert 'nodemanager_admin_keys_problem{account="ghost"} 1.0' in text
    assert 'nodemanager_admin_keys_held_removals{account="site_admin"} 0.0' in text


def test_handlers_from_config(host: FakeHost, store: Store, tmp_path: Path) -> None:
    off = parse_config({"node": {"data_dir": str(tmp_path)}})
    on = parse_config({"node": {"data_dir": str(tmp_path)}, "accounts": {"manage_keys": ["site_admin"]},
                       "sync": {"confirm_after": 3}})
    assert document_handlers_from_config(off, host=host, store=store, hollow=False) == []
    assert document_handlers_from_config(on, host=host, store=store, hollow=True) == []
    [made] = document_handlers_from_config(on, host=host, store=store, hollow=False)
    assert isinstance(made, AdminKeys) and made.name == "admin_keys" and made.confirm_after == 3


# --------------------------------------------------------------------------- through build_node


def write_document(path: Path, timestamp: int, accounts: object) -> None:
    data = {"timestamp": timestamp, "node_id": 1, "slivers": [], "accounts": accounts}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def test_sync_through_build_node_with_a_file_document(host: FakeHost, tmp_path: Path) -> None:
    document = tmp_path / "slivers.json"
    (tmp_path / "node_id").write_text("1\n")
    config = parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"url": f"file://{document}", "node_id_file": str(tmp_path / "node_id"), "poll_jitter": 0},
        "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""},
        "slivers": {"backend": "account", "keys_dir": str(tmp_path / "keys")},
        "accounts": {"manage_keys": ["site_admin", "root"]},
    })
    host.makedirs_owned(Path("/root"), 0, 0, 0o700)
    host.makedirs_owned(Path("/root/.ssh"), 0, 0, 0o700)
    host.add_file(Path("/root/.ssh/authorized_keys"), MINE, uid=0, gid=0, mode=0o600)
    node = build_node(config, host=host, enforcement=None)
    node.start(serve=False)
    try:
        now = int(time.time())
        write_document(document, now, [{"name": "site_admin", "keys": [K1]}, {"name": "root", "keys": [K2]},
                                       {"name": "pl_ops", "keys": [K1]}])
        assert node.sync_once().ok
        assert split_keys_file(host.files[ADMIN_KEYS].data).keys == (K1,)
        assert host.files[Path("/root/.ssh/authorized_keys")].data == MINE + render_block([K2])
        write_document(document, now + 1, [{"name": "root", "keys": [K2]}])  # site_admin: every key removed
        assert node.sync_once().ok
        assert split_keys_file(host.files[ADMIN_KEYS].data).keys == (K1,)  # held
        assert "site_admin: removal of all 1 key(s) HELD" in render_status(node.store)
        write_document(document, now + 2, [{"name": "root", "keys": [K2]}])
        assert node.sync_once().ok
        assert split_keys_file(host.files[ADMIN_KEYS].data).keys == ()  # confirmed
        assert host.files[Path("/root/.ssh/authorized_keys")].data == MINE + render_block([K2])
    finally:
        node.close()
