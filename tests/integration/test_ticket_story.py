"""The whole ticket story, all real (root): authority -> controller -> SSH -> node -> account.

1. The bundled authority serves a controller slice (``nm-controller``) and a user, carol, who
   belongs to it. The node manager (``daemon.Node`` from a real configuration, API on a Unix
   socket) syncs once: the controller's delegate account appears.
2. The authority's operator adds a delegated slice controlled by the controller. Before the node
   polls again, carol gets its ticket with ``GetSliceTicket`` (password auth, over XML-RPC) and
   the controller delivers it: ``ssh controller@node < ticket_request.xml``. Answer: 1.
3. Over SSH (``XmlRpcOverSsh``) the controller runs Create, Start, Stop and Destroy on the
   delegated sliver: its account really appears (pwd), survives a sync (the ticket is newer than
   the authority's data), and goes.
4. Delivering the same ticket again is a replay: Fault 102.

The node is built by ``daemon.build_node`` from a real configuration (its ticket verifier from
``authority.ticket_cert``); the backend is ``AccountBackend.from_config``'s, except that the shells
file is a copy (the real /etc/shells is left alone), and resource enforcement is off (this story
is about tickets; enforcement has its own tests). Accounts are named ``nmt4...`` and always
removed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodemanager.api import forward
from nodemanager.api.client import XmlRpcOverSsh
from nodemanager.authority.issue import password_digest
from nodemanager.authority.server import AuthorityServer
from nodemanager.authority.signing import export_certificate
from nodemanager.backends.account import AccountBackend
from nodemanager.backends.delegate import (
    default_forward_command,
    unprivileged_access_problems,
    wrapper_path_for,
)
from nodemanager.config import Config, parse_config
from nodemanager.core.records import SOURCE_TICKET
from nodemanager.daemon import Node, build_node
from nodemanager.host import Host
from nodemanager.testing.accounts import private_keys_dir, purge_accounts, uid_base_for_tests
from nodemanager.testing.sshd import PrivateSshd, make_client_key, sshd_available

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real accounts and sshd"),
    pytest.mark.skipif(sshd_available() is not None, reason=f"no private sshd: {sshd_available()}"),
]

PREFIX = "nmt4"
CONTROLLER = "story_ctrl"
DELEGATED = "story_deleg"
NODE_ID = 7
NODE_KEY = "story-node-key"
USER, PASSWORD = "carol", "carol-secret"
DAVE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPUu1j+SFdR6aTH02ad8zTIUcWRL3mwYxtpeUEMqQvvU dave@example.org"

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


def ours() -> set[str]:
    return {entry.pw_name for entry in pwd.getpwall() if entry.pw_name.startswith(PREFIX)}


def purge() -> None:
    purge_accounts(PREFIX)
    subprocess.run(["groupdel", PREFIX + "slivers"], capture_output=True, check=False)


def write_data(path: Path, text: str, age: int) -> None:
    """Write the authority's data with an mtime ``age`` seconds ago (its documents' timestamp)."""
    path.write_text(text)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def forward_shell(home_root: Path) -> str:
    """``slivers.delegate_shell``: "" when delegate accounts can run the installed program, else
    a wrapper running its source file with /usr/bin/python3 (root's python may be private)."""
    if not unprivileged_access_problems(default_forward_command()):
        return ""
    bin_dir = home_root / "bin"
    bin_dir.mkdir(mode=0o755)
    source = bin_dir / "forward_api_calls.py"
    shutil.copyfile(forward.__file__, source)
    source.chmod(0o644)
    program = bin_dir / "forward_api_calls"
    program.write_text(f'#!/bin/sh\nexec /usr/bin/python3 {source} "$@"\n')
    program.chmod(0o755)
    return str(program)


@dataclass
class Story:
    manager: Node
    server: AuthorityServer
    sshd: PrivateSshd
    data: Path
    key: Path
    tmp_path: Path

    @property
    def target(self) -> str:
        return f"{PREFIX}{CONTROLLER}@127.0.0.1"

    def api(self) -> XmlRpcOverSsh:
        return XmlRpcOverSsh(self.target, ssh_options=self.sshd.ssh_options(self.key), timeout=60)

    def deliver(self, request: Path) -> subprocess.CompletedProcess[bytes]:
        """``cat ticket_request.xml | ssh controller@node``."""
        argv = ["ssh", *self.sshd.ssh_options(self.key), "-o", "BatchMode=yes", self.target]
        with request.open("rb") as stdin:
            return subprocess.run(argv, stdin=stdin, capture_output=True, timeout=60, check=False)


def node_config(tmp_path: Path, home_root: Path, url: str, cert: Path, keys_dir: Path) -> Config:
    (tmp_path / "node_id").write_text(f"{NODE_ID}\n")
    (tmp_path / "node_key").write_text(f"{NODE_KEY}\n")
    run_dir = home_root / "run"  # root-owned 0755, outside /tmp: the delegate wrapper lives here
    run_dir.mkdir(mode=0o755)
    return parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": str(tmp_path / "nm.log")},
        "authority": {"url": url, "node_id_file": str(tmp_path / "node_id"),
                      "node_key_file": str(tmp_path / "node_key"), "ticket_cert": str(cert), "timeout": 5},
        "api": {"tcp": "", "unix_socket": str(run_dir / "api.sock")},
        "metrics": {"listen": ""},
        "slivers": {"home_root": str(home_root), "name_prefix": PREFIX, "stop_grace": 1, "shell": "/bin/sh",
                    "delegate_shell": forward_shell(home_root), "uid_base": uid_base_for_tests(),
                    "keys_dir": str(keys_dir), "group": PREFIX + "slivers"},
    })


@pytest.fixture
def keys_dir() -> Iterator[Path]:
    """sshd reads the node's keys here: a private root-owned directory StrictModes accepts."""
    with private_keys_dir() as path:
        yield path


@pytest.fixture
def story(tmp_path: Path, home_root: Path, keys_dir: Path) -> Iterator[Story]:
    purge()
    key, public = make_client_key(tmp_path)
    data = tmp_path / "authority.toml"
    base = AUTHORITY.format(node=NODE_ID, node_key=NODE_KEY, controller=CONTROLLER, controller_key=public,
                            user=USER, digest=password_digest(PASSWORD))
    write_data(data, base, age=100)
    server = AuthorityServer(data, "127.0.0.1", 0)
    server.start()
    manager: Node | None = None
    try:
        cert = export_certificate(data, tmp_path / "authority.pem")
        config = node_config(tmp_path, home_root, server.url, cert, keys_dir)
        shells = home_root / "shells"
        shutil.copyfile("/etc/shells", shells)
        s = config.slivers
        backend = AccountBackend(
            Host(), home_root=home_root, shell=s.shell, name_prefix=s.name_prefix, stop_grace=float(s.stop_grace),
            delegate_shell=wrapper_path_for(config.api.unix_socket), delegate_socket=config.api.unix_socket,
            forward_command=default_forward_command(s.delegate_shell), shells_file=shells,
            uid_base=s.uid_base, keys_dir=Path(s.keys_dir), group=s.group,
        )
        manager = build_node(config, backend=backend, enforcement=None)
        assert manager.api.tickets is not None  # from authority.ticket_cert
        manager.start()
        with PrivateSshd(use_pam=True, keys_dir=Path(s.keys_dir), sliver_group=s.group) as sshd:
            yield Story(manager, server, sshd, data, key, tmp_path)
    finally:
        if manager is not None:
            manager.close()
        server.stop()
        purge()


def test_ticket_story(story: Story) -> None:
    manager = story.manager
    controller_account, delegated_account = PREFIX + CONTROLLER, PREFIX + DELEGATED

    # 1. the first sync creates the controller's delegate account
    outcome = manager.sync_once()
    assert outcome.ok, outcome.summary()
    assert ours() == {controller_account}

    # 2. a delegated slice appears at the authority; carol gets its ticket; the controller delivers it
    write_data(story.data, story.data.read_text()
               + DELEGATED_SLICE.format(delegated=DELEGATED, controller=CONTROLLER, key=DAVE), age=50)
    with xmlrpc.client.ServerProxy(story.server.url) as plc:
        auth = {"AuthMethod": "password", "Username": USER, "AuthString": PASSWORD}
        ticket = plc.GetSliceTicket(auth, DELEGATED)
    assert manager.store.sliver(DELEGATED) is None  # the node has not polled since
    request = story.tmp_path / "ticket_request.xml"
    request.write_text(xmlrpc.client.dumps((ticket,), "Ticket"))
    delivered = story.deliver(request)
    assert delivered.returncode == 0, (delivered.stderr, story.sshd.log()[-2000:])
    assert xmlrpc.client.loads(delivered.stdout) == ((1,), None)  # the response body and nothing else
    record = manager.store.sliver(DELEGATED)
    assert record is not None and record.source == SOURCE_TICKET and record.controller == CONTROLLER
    assert record.keys == (DAVE,) and ("nm_cpu_share", "3") in record.attributes
    assert delegated_account not in ours()  # the account waits for Create

    # 3. Create, Start, Stop, Destroy over SSH, as the controller
    api = story.api()
    assert api.Create(DELEGATED) == 1
    entry = pwd.getpwnam(delegated_account)
    assert Path(manager.config.slivers.keys_dir, delegated_account).read_text() == DAVE + "\n"
    assert manager.sync_once().ok  # the authority's older data neither replaces nor removes it
    record = manager.store.sliver(DELEGATED)
    assert record is not None and record.source == SOURCE_TICKET
    assert pwd.getpwnam(delegated_account).pw_uid == entry.pw_uid
    assert api.Start(DELEGATED) == 1
    assert api.Stop(DELEGATED) == 1
    assert api.Destroy(DELEGATED) == 1
    with pytest.raises(KeyError):
        pwd.getpwnam(delegated_account)
    assert not Path(entry.pw_dir).exists()
    assert manager.store.sliver(DELEGATED) is None
    assert ours() == {controller_account}

    # 4. the same ticket again is a replay
    replayed = story.deliver(request)
    assert replayed.returncode == 0, replayed.stderr
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(replayed.stdout)
    assert caught.value.faultCode == 102
    assert "replay" in caught.value.faultString
    assert manager.store.sliver(DELEGATED) is None
