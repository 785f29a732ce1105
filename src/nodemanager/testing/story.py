"""Scaffolding shared by the real-sshd integration tests (the ticket stories, the observer and SSH
API tests), and the store snapshot the ticket unit tests compare.

The ticket stories (XML-DSig in ``test_ticket_story.py``, OpenPGP in ``test_pgp_ticket_story.py``)
run the same node: the bundled authority serving a controller slice and a user, a node built by
``daemon.build_node`` from a real configuration, a private sshd in front of it. They differ in the
ticket format (and so in the node's ``authority`` verifier settings) and in what the story does;
:class:`TicketStory` builds the common node once, parametrised by the account prefix and names,
so that each test file keeps only what is its own. Every real account a story makes carries its
prefix, and :meth:`TicketStory.purge` removes them (with the sliver group) before and after.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..api import forward
from ..api.client import XmlRpcOverSsh
from ..plc.issue import password_digest
from ..plc.server import AuthorityServer
from ..plc.signing import export_certificate
from ..backends.account import AccountBackend
from ..backends.delegate import default_forward_command, unprivileged_access_problems, wrapper_path_for
from ..config import Config, parse_config
from ..daemon import Node, build_node
from ..host import Host
from ..store import Store
from .accounts import private_keys_dir, purge_accounts, uid_base_for_tests
from .sshd import PrivateSshd, make_client_key, sshd_available


def real_sshd_marks() -> list[pytest.MarkDecorator]:
    """``pytestmark`` of a test module that makes real accounts and runs a private sshd: marked
    ``root`` and skipped, with the reason, where it cannot run (one list, so the modules agree)."""
    return [
        pytest.mark.root,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real accounts and sshd"),
        pytest.mark.skipif(sshd_available() is not None, reason=f"no private sshd: {sshd_available()}"),
    ]


def forward_command(home_root: Path) -> list[str]:
    """The installed forward_api_calls when delegate accounts (other users) can run it, else a
    readable copy of its source file (standard library only) run by /usr/bin/python3: root's
    python may be private (see dependencies.md). The copy lives in ``home_root/bin``."""
    installed = default_forward_command()
    if not unprivileged_access_problems(installed):
        return installed
    bin_dir = home_root / "bin"
    bin_dir.mkdir(mode=0o755, exist_ok=True)
    copy = bin_dir / "forward_api_calls.py"
    shutil.copyfile(forward.__file__, copy)
    copy.chmod(0o644)
    return ["/usr/bin/python3", str(copy)]


def forward_shell(home_root: Path) -> str:
    """``slivers.delegate_shell`` for a configuration: "" (the installed program) when delegate
    accounts can run it, else a wrapper script running :func:`forward_command`'s copy (the option
    names one program, not an argv)."""
    command = forward_command(home_root)
    if command == default_forward_command():
        return ""
    program = home_root / "bin" / "forward_api_calls"
    program.write_text(f'#!/bin/sh\nexec {" ".join(command)} "$@"\n')
    program.chmod(0o755)
    return str(program)


def write_data(path: Path, text: str, age: int) -> None:
    """Write the authority's data with an mtime ``age`` seconds ago (its documents' timestamp):
    a story appends to it later with a smaller age, so the authority's data gets newer."""
    path.write_text(text)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def store_snapshot(store: Store) -> tuple[object, ...]:
    """Everything a refused ticket must leave as it was: the records, the account states and the
    ticket marks (the replay guard, which the Store reads one slice at a time)."""
    with sqlite3.connect(store.path) as conn:
        marks = sorted(conn.execute("SELECT slice, issued FROM ticket_marks").fetchall())
    return store.slivers(), store.accounts(), marks


AUTHORITY = """
[[nodes]]
id = {node}
key = "{node_key}"

[[slices]]
name = "{controller}"
id = 1
instantiation = "nm-controller"
keys = ["{controller_key}"]

[[users]]
name = "{user}"
password_sha256 = "{digest}"
slices = ["{controller}"]
"""

DELEGATED_SLICE = """
[[slices]]
name = "{delegated}"
id = 2
instantiation = "delegated"
controller = "{controller}"
keys = ["{key}"]
[slices.attributes]
nm_cpu_share = 3
"""


@dataclass
class StoryNode:
    """A running story node, as a story's fixture yields it."""

    manager: Node
    server: AuthorityServer
    sshd: PrivateSshd
    data: Path  # the authority's data file
    key: Path  # the controller's private key
    tmp_path: Path
    controller_account: str

    def ssh(self, user: str, key: Path, *command: str, stdin: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        """``ssh user@node command`` through the private sshd, ``stdin`` fed from a file."""
        argv = ["ssh", *self.sshd.ssh_options(key), "-o", "BatchMode=yes", f"{user}@127.0.0.1", *command]
        with (stdin or Path("/dev/null")).open("rb") as source:
            return subprocess.run(argv, stdin=source, capture_output=True, timeout=60, check=False)

    def deliver(self, request: Path) -> subprocess.CompletedProcess[bytes]:
        """``cat ticket_request.xml | ssh controller@node``."""
        return self.ssh(self.controller_account, self.key, stdin=request)

    def api(self) -> XmlRpcOverSsh:
        """The API as the controller, over SSH."""
        return XmlRpcOverSsh(f"{self.controller_account}@127.0.0.1", ssh_options=self.sshd.ssh_options(self.key),
                             timeout=60)


@dataclass(frozen=True)
class TicketStory:
    """One ticket story's names: its account ``prefix`` (what :meth:`purge` removes), the
    controller and delegated slices, the node's identity and the authority's user."""

    prefix: str
    controller: str
    delegated: str
    node_key: str
    node_id: int = 7
    user: str = "carol"
    password: str = "carol-secret"

    @property
    def group(self) -> str:
        return self.prefix + "slivers"

    def account(self, sliver: str) -> str:
        return self.prefix + sliver

    def ours(self) -> set[str]:
        """The real accounts with the story's prefix."""
        return {entry.pw_name for entry in pwd.getpwall() if entry.pw_name.startswith(self.prefix)}

    def purge(self) -> None:
        purge_accounts(self.prefix)
        subprocess.run(["groupdel", self.group], capture_output=True, check=False)

    def delegated_slice(self, key: str) -> str:
        """The authority data that adds the delegated slice (controlled by the controller)."""
        return DELEGATED_SLICE.format(delegated=self.delegated, controller=self.controller, key=key)

    def first_sync(self, node: StoryNode) -> None:
        """Every story's step 1: the first sync creates the controller's delegate account, and
        no other account of the prefix."""
        outcome = node.manager.sync_once()
        assert outcome.ok, outcome.summary()
        assert self.ours() == {self.account(self.controller)}

    def add_delegated_slice(self, node: StoryNode, key: str) -> None:
        """The authority's operator adds the delegated slice (with ``key``): the data gets newer
        (50 s old) but the node has not polled it."""
        write_data(node.data, node.data.read_text() + self.delegated_slice(key), age=50)

    def node_config(self, tmp_path: Path, home_root: Path, keys_dir: Path, authority: Mapping[str, Any]) -> Config:
        """The node's configuration; ``authority`` is its ``[authority]`` table but for the node
        identity files written here (the ticket verifiers' settings, the url)."""
        (tmp_path / "node_id").write_text(f"{self.node_id}\n")
        (tmp_path / "node_key").write_text(f"{self.node_key}\n")
        run_dir = home_root / "run"  # root-owned 0755, outside /tmp: the delegate wrapper lives here
        run_dir.mkdir(mode=0o755)
        return parse_config({
            "node": {"data_dir": str(tmp_path / "data"), "log_file": str(tmp_path / "nm.log")},
            "authority": {"node_id_file": str(tmp_path / "node_id"), "node_key_file": str(tmp_path / "node_key"),
                          "timeout": 5, **authority},
            "api": {"tcp": "", "unix_socket": str(run_dir / "api.sock")},
            "metrics": {"listen": ""},
            "slivers": {"home_root": str(home_root), "name_prefix": self.prefix, "stop_grace": 1,
                        "shell": "/bin/sh", "delegate_shell": forward_shell(home_root),
                        "uid_base": uid_base_for_tests(), "keys_dir": str(keys_dir), "group": self.group},
        })

    @contextmanager
    def run(self, tmp_path: Path, home_root: Path,
            verifiers: Callable[[Path], Mapping[str, str]] = lambda data: {}) -> Iterator[StoryNode]:
        """Start the story's node: authority data (100 s old) with the controller and the user,
        the bundled authority serving it, the node (ticket verifier from ``authority.ticket_cert``
        plus what ``verifiers(data)`` adds, resource enforcement off) and a private sshd.

        The backend is ``AccountBackend.from_config``'s, except that the shells file is a copy
        (the real /etc/shells is left alone). The keys directory is private to the story; the
        accounts are purged before and after."""
        with private_keys_dir() as keys_dir:
            self.purge()
            key, public = make_client_key(tmp_path)
            data = tmp_path / "authority.toml"
            write_data(data, AUTHORITY.format(node=self.node_id, node_key=self.node_key, controller=self.controller,
                                              controller_key=public, user=self.user,
                                              digest=password_digest(self.password)), age=100)
            server = AuthorityServer(data, "127.0.0.1", 0)
            server.start()
            manager: Node | None = None
            try:
                cert = export_certificate(data, tmp_path / "authority.pem")
                authority = {"url": server.url, "ticket_cert": str(cert), **verifiers(data)}
                config = self.node_config(tmp_path, home_root, keys_dir, authority)
                shells = home_root / "shells"
                shutil.copyfile("/etc/shells", shells)
                s = config.slivers
                backend = AccountBackend(
                    Host(), home_root=home_root, shell=s.shell, name_prefix=s.name_prefix,
                    stop_grace=float(s.stop_grace), delegate_shell=wrapper_path_for(config.api.unix_socket),
                    delegate_socket=config.api.unix_socket, forward_command=default_forward_command(s.delegate_shell),
                    shells_file=shells, uid_base=s.uid_base, keys_dir=Path(s.keys_dir), group=s.group,
                )
                manager = build_node(config, backend=backend, enforcement=None)
                assert manager.api.tickets is not None  # from the authority's ticket settings
                manager.start()
                with PrivateSshd(use_pam=True, keys_dir=Path(s.keys_dir), sliver_group=s.group) as sshd:
                    yield StoryNode(manager, server, sshd, data, key, tmp_path, self.account(self.controller))
            finally:
                if manager is not None:
                    manager.close()
                server.stop()
                self.purge()
