"""XML-RPC over SSH end to end (root): a real OpenSSH sshd, a real delegate account, the real API.

Pieces, all real: :class:`PrivateSshd` on a loopback port (with ``UsePAM yes`` and ``UsePAM no``),
a controller sliver's account made through ``SliverOperations`` + ``AccountBackend`` with a
delegate shell (the generated wrapper running forward_api_calls), and the daemon's ``ApiServer``
serving ``NodeManagerApi`` over a temporary ``Store`` on a Unix socket. The delegate account's login
shell connects to that socket as the account's uid, so what the API sees is the controller.

Accounts are named ``nmd...`` and always removed; the shells file is a copy of /etc/shells in the
test's directory (the real one is left alone). forward_api_calls runs from the installed console
script when every user can execute it, else from its source file with /usr/bin/python3 (root's
python may be private: see dependencies.md).
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import shutil
import stat
import subprocess
import xmlrpc.client
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodemanager.api import callcli, forward
from nodemanager.api.client import SshTransportError, XmlRpcOverSsh, local_proxy
from nodemanager.api.methods import NodeManagerApi, caller_resolver
from nodemanager.api.server import ApiServer
from nodemanager.backends.account import AccountBackend
from nodemanager.core.records import NM_CONTROLLER, PLC_INSTANTIATED, Sliver
from nodemanager.host import Host
from nodemanager.operations import SliverOperations
from nodemanager.store import Store
from nodemanager.testing.accounts import private_keys_dir, purge_account, removed_group, uid_base_for_tests
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.sshd import PrivateSshd, make_client_key
from nodemanager.testing.story import forward_command, real_sshd_marks
from nodemanager.workers import WorkerPool

pytestmark = real_sshd_marks()

PREFIX = "nmd"
_serial = itertools.count()


def sliver(name: str, instantiation: str, keys: tuple[str, ...] = ()) -> Sliver:
    return Sliver(name=name, slice_id=zlib.crc32(name.encode()) % 10**6, instantiation=instantiation, expires=2**31 - 1, timestamp=1,
                  keys=keys)


purge = purge_account


@dataclass
class Node:
    home_root: Path
    socket: Path
    wrapper: Path
    shells: Path
    store: Store
    ops: SliverOperations
    backend: AccountBackend
    controller: str
    other: str
    key: Path

    @property
    def account(self) -> str:
        return PREFIX + self.controller

    def uid(self, name: str) -> int:
        state = self.store.account(name)
        assert state is not None and state.uid is not None
        return state.uid


@pytest.fixture(scope="module")
def access() -> Iterator[tuple[Path, str]]:
    """The node's keys directory and sliver group, private to this module (sshd reads them too)."""
    with private_keys_dir() as keys_dir, removed_group(f"{PREFIX}ssh{os.getpid() % 100000}") as group:
        yield keys_dir, group


@pytest.fixture
def node(home_root: Path, tmp_path: Path, access: tuple[Path, str]) -> Iterator[Node]:
    run_dir = home_root / "run"
    run_dir.mkdir(mode=0o755)
    socket_path, wrapper, shells = run_dir / "api.sock", run_dir / "delegate-shell", home_root / "shells"
    shutil.copyfile("/etc/shells", shells)
    key, public = make_client_key(tmp_path)
    n = next(_serial)
    controller, other = f"it_c{os.getpid() % 10000}x{n}", f"it_o{os.getpid() % 10000}x{n}"
    store = Store(tmp_path / "nm.db")
    backend = AccountBackend(Host(), home_root=home_root, shell="/bin/sh", name_prefix=PREFIX, stop_grace=1.0,
                             uid_base=uid_base_for_tests(), keys_dir=access[0], group=access[1],
                             delegate_shell=wrapper, delegate_socket=str(socket_path),
                             forward_command=forward_command(home_root), shells_file=shells)
    ops = SliverOperations(store, backend, ManualClock())
    pool = WorkerPool(2)
    api = NodeManagerApi(store=store, pool=pool, operations=ops,
                         resolve_caller=caller_resolver(store, Host().getpwuid), operation_timeout=30.0)
    server = ApiServer(api.dispatch, tcp="", unix_socket=str(socket_path))
    try:
        records = [sliver(controller, NM_CONTROLLER, (public,)), sliver(other, PLC_INSTANTIATED)]
        store.apply_records(records, [])
        for record in records:
            ops.ensure(record)
        server.start()
        yield Node(home_root, socket_path, wrapper, shells, store, ops, backend, controller, other, key)
    finally:
        server.stop()
        pool.shutdown(timeout=10)
        store.close()
        for name in (controller, other):
            purge(PREFIX + name)


@pytest.fixture(params=[True, False], ids=["UsePAM-yes", "UsePAM-no"])
def sshd(request: pytest.FixtureRequest, access: tuple[Path, str]) -> Iterator[PrivateSshd]:
    with PrivateSshd(use_pam=request.param, keys_dir=access[0], sliver_group=access[1]) as server:
        yield server


def ssh(sshd: PrivateSshd, node: Node, *command: str, stdin: bytes = b"", key: Path | None = None
        ) -> subprocess.CompletedProcess[bytes]:
    argv = ["ssh", *sshd.ssh_options(key or node.key), "-o", "BatchMode=yes", f"{node.account}@127.0.0.1", *command]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)


def test_the_delegate_account_is_set_up(node: Node) -> None:
    entry = Host().getpwnam(node.account)
    assert entry is not None and entry.shell == str(node.wrapper)
    wrapper = node.wrapper.stat()
    assert (wrapper.st_uid, stat.S_IMODE(wrapper.st_mode)) == (0, 0o755)
    assert str(node.wrapper) in node.shells.read_text().splitlines()
    hush = (node.home_root / node.account / ".hushlogin").stat()
    assert (hush.st_uid, hush.st_gid, stat.S_IMODE(hush.st_mode), hush.st_size) == (0, 0, 0o644, 0)
    keys = (node.backend.keys_dir / node.account).read_text()
    assert keys.startswith("restrict ssh-ed25519 ")


def test_piped_request_prints_exactly_the_response(sshd: PrivateSshd, node: Node) -> None:
    request = xmlrpc.client.dumps((), "GetXIDs").encode()
    done = ssh(sshd, node, stdin=request)
    assert done.returncode == 0, (done.stderr, sshd.log()[-2000:])
    expected = {node.controller: node.uid(node.controller), node.other: node.uid(node.other)}
    assert xmlrpc.client.loads(done.stdout) == ((expected,), None)
    # byte for byte what the daemon answers the same request (no motd, no banner, nothing else)
    assert node.backend.delegate is not None
    direct = subprocess.run([*node.backend.delegate.forward_command, "--socket", str(node.socket)],
                            input=request, capture_output=True, timeout=60, check=True)
    assert done.stdout == direct.stdout
    assert done.stdout.startswith(b"<?xml")


def test_the_caller_is_the_controller_not_root(sshd: PrivateSshd, node: Node) -> None:
    own = ssh(sshd, node, stdin=xmlrpc.client.dumps((node.controller,), "GetRSpec").encode())
    assert own.returncode == 0 and isinstance(xmlrpc.client.loads(own.stdout)[0][0], dict)
    foreign = ssh(sshd, node, stdin=xmlrpc.client.dumps((node.other,), "GetRSpec").encode())
    assert foreign.returncode == 0
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(foreign.stdout)
    assert caught.value.faultCode == 108
    with local_proxy(node.socket) as root_api:  # root may read it: the refusal was about the caller
        assert isinstance(root_api.GetRSpec(node.other), dict)


@pytest.mark.parametrize("command", [["id"], ["-s", "sftp"]], ids=["command", "sftp-subsystem"])
def test_commands_are_refused(sshd: PrivateSshd, node: Node, command: list[str]) -> None:
    if command[0] == "-s":
        argv = ["ssh", *sshd.ssh_options(node.key), "-o", "BatchMode=yes", "-s", f"{node.account}@127.0.0.1", "sftp"]
        done = subprocess.run(argv, input=b"", capture_output=True, timeout=60, check=False)
    else:
        done = ssh(sshd, node, *command, stdin=xmlrpc.client.dumps((), "GetXIDs").encode())
    assert done.returncode == forward.EXIT_REFUSED
    assert done.stdout == b""
    if command[0] != "-s":  # sshd does not forward a subsystem's stderr
        assert b"only speaks XML-RPC over SSH" in done.stderr


def test_python_client_over_ssh(sshd: PrivateSshd, node: Node) -> None:
    api = XmlRpcOverSsh(f"{node.account}@127.0.0.1", ssh_options=sshd.ssh_options(node.key), timeout=60)
    assert api.GetXIDs()[node.controller] == node.uid(node.controller)
    assert api.SetLoans(node.controller, []) == 1
    with pytest.raises(xmlrpc.client.Fault) as caught:
        api.GetLoans(node.other)
    assert caught.value.faultCode == 108


def test_wrong_key_is_an_ssh_transport_error(sshd: PrivateSshd, node: Node, tmp_path: Path) -> None:
    stranger, _ = make_client_key(tmp_path, "stranger")
    api = XmlRpcOverSsh(f"{node.account}@127.0.0.1", ssh_options=sshd.ssh_options(stranger), timeout=60)
    with pytest.raises(SshTransportError, match="Permission denied") as caught:
        api.GetXIDs()
    assert caught.value.returncode == 255


def test_nodemanager_call_over_ssh(sshd: PrivateSshd, node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    options = [f"--ssh-option={option}" for option in sshd.ssh_options(node.key)]
    status = callcli.main(["--config", "/nonexistent/nodemanager.toml", "call",
                           "--ssh", f"{node.account}@127.0.0.1", *options, "GetXIDs"])
    out, err = capsys.readouterr()
    assert status == 0, err
    rows = dict(line.split() for line in out.splitlines())
    assert rows == {node.controller: str(node.uid(node.controller)), node.other: str(node.uid(node.other))}
    stdout, stderr = io.StringIO(), io.StringIO()
    args = _call_args("--ssh", f"{node.account}@127.0.0.1", *options, "GetRSpec", node.other)
    assert callcli.cmd_call(args, stdout=stdout, stderr=stderr) == 1
    assert stderr.getvalue().startswith("Fault 108: ")


def _call_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    callcli.add_call_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["call", *argv])


def test_destroying_the_controller_removes_account_and_shell_registration(node: Node) -> None:
    node.ops.destroy(node.controller)
    assert Host().getpwnam(node.account) is None
    assert not (node.home_root / node.account).exists()
    assert str(node.wrapper) not in node.shells.read_text().splitlines()
    assert node.shells.read_text().splitlines() == Path("/etc/shells").read_text().splitlines()


def test_hushlogin_is_what_keeps_pam_motd_out_of_the_answer(node: Node) -> None:
    """Debian's sshd prints the motd through pam_motd into a command-less session's stdout; the
    root-owned ~/.hushlogin suppresses it, and configure puts it back if it goes missing."""
    hush = node.home_root / node.account / ".hushlogin"
    request = xmlrpc.client.dumps((), "GetXIDs").encode()
    with PrivateSshd(use_pam=True, keys_dir=node.backend.keys_dir, sliver_group=node.backend.group) as sshd:
        hush.unlink()
        polluted = ssh(sshd, node, stdin=request)
        record = node.store.sliver(node.controller)
        assert record is not None
        node.backend.configure(record, {})
        assert hush.stat().st_uid == 0
        clean = ssh(sshd, node, stdin=request)
    assert clean.returncode == 0 and xmlrpc.client.loads(clean.stdout)
    if Path("/etc/motd").exists() or Path("/run/motd.dynamic").exists():
        assert polluted.stdout != clean.stdout and polluted.stdout.endswith(clean.stdout)


def test_delegate_keys_cannot_forward_ports(node: Node) -> None:
    with PrivateSshd(use_pam=False, keys_dir=node.backend.keys_dir, sliver_group=node.backend.group) as sshd:
        argv = ["ssh", *sshd.ssh_options(node.key), "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                "-N", "-R", "0:127.0.0.1:9", f"{node.account}@127.0.0.1"]
        done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == 255
    assert b"forwarding failed" in done.stderr
