"""The bundled authority serves ``conf_files``: in GetSlivers from its data file, and their
content over HTTP, so the node's handler can be exercised against it end to end."""

from __future__ import annotations

import http.client
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

from nodemanager.authority.auth import hmac_auth
from nodemanager.authority.parse import parse_getslivers_with_protection
from nodemanager.conffiles import ConfFilesHandler, HttpSourceFetcher
from nodemanager.core.conffiles import validate_entries
from nodemanager.core.errors import ConfigError
from nodemanager.plc.model import getslivers_struct, load_authority_text
from nodemanager.plc.server import AuthorityServer
from nodemanager.testing.fakehost import FakeHost

pytestmark = pytest.mark.timeout(30)

DATA = """
[authority]
conf_files_dir = "files"

[[nodes]]
id = 1
key = "node-one-key"

[[nodes]]
id = 2
key = "node-two-key"

[[conf_files]]
source = "motd"
dest = "/etc/nm/motd"
postinstall_cmd = "echo done"

[[conf_files]]
source = "sub/sysctl.conf"
dest = "/etc/nm/sysctl.conf"
file_permissions = "600"
nodes = [2]
"""


def load(text: str) -> Any:
    return load_authority_text(text, timestamp=1000, base_time=1000, origin="test.toml")


def test_getslivers_carries_the_nodes_conf_files_as_plc_sends_them() -> None:
    data = load(DATA)
    one, two = getslivers_struct(data, 1)["conf_files"], getslivers_struct(data, 2)["conf_files"]
    assert [e["dest"] for e in one] == ["/etc/nm/motd"]
    assert [e["source"] for e in two] == ["conf_files/motd", "conf_files/sub/sysctl.conf"]
    assert one[0] == {"conf_file_id": 1, "enabled": True, "source": "conf_files/motd", "dest": "/etc/nm/motd",
                      "file_owner": "root", "file_group": "root", "file_permissions": "644", "preinstall_cmd": "",
                      "postinstall_cmd": "echo done", "error_cmd": "", "ignore_cmd_errors": False,
                      "always_update": False}
    doc, _ = parse_getslivers_with_protection(getslivers_struct(data, 2), expected_node_id=2)
    validated = validate_entries(doc.members["conf_files"], ["/etc/nm"])
    assert len(validated.entries) == 2 and validated.outcomes == ()
    assert "conf_files" not in getslivers_struct(load('[[nodes]]\nid = 1\nkey = "k"\n'), 1)


@pytest.mark.parametrize(("extra", "where"), [
    ('[[conf_files]]\nsource = "../x"\ndest = "/etc/x"\n', "conf_files[2] ('/etc/x').source"),
    ('[[conf_files]]\nsource = "x"\ndest = "etc/x"\n', ".dest"),
    ('[[conf_files]]\nsource = "x"\ndest = "/etc/x"\nfile_permissions = "rw"\n', ".file_permissions"),
    ('[[conf_files]]\nsource = "x"\ndest = "/etc/x"\nnodes = [9]\n', ".nodes"),
    ('[[conf_files]]\nsource = "x"\ndest = "/etc/x"\nfile_owner = "Bad Name"\n', ".file_owner"),
])
def test_bad_entries_name_the_entry_and_field(extra: str, where: str) -> None:
    with pytest.raises(ConfigError, match=r"conf_files\[.*" + where.split(".")[-1]):
        load(DATA + extra)


@pytest.fixture
def served(tmp_path: Path) -> Any:
    (tmp_path / "files" / "sub").mkdir(parents=True)
    (tmp_path / "files" / "motd").write_bytes(b"welcome\n")
    (tmp_path / "files" / "sub" / "sysctl.conf").write_bytes(b"net.x = 1\n")
    (tmp_path / "secret").write_bytes(b"secret")
    (tmp_path / "files" / "link").symlink_to(tmp_path / "secret")
    data = tmp_path / "authority.toml"
    data.write_text(DATA)
    with AuthorityServer(data) as server:
        yield server


def get(server: AuthorityServer, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_files_are_served_and_nothing_else(served: AuthorityServer) -> None:
    assert get(served, "/conf_files/motd?node_id=1") == (200, b"welcome\n")
    assert get(served, "/conf_files/sub/sysctl.conf") == (200, b"net.x = 1\n")
    for path in ("/conf_files/link", "/conf_files/../secret", "/conf_files/%2e%2e/secret", "/conf_files/missing",
                 "/conf_files/", "/conf_files/sub"):
        assert get(served, path)[0] == 404, path


def test_the_node_handler_installs_from_the_bundled_authority(served: AuthorityServer) -> None:
    """GetSlivers over XML-RPC, then the handler (over FakeHost: no root needed) fetches the
    content from the same server."""
    body = xmlrpc.client.dumps((hmac_auth(2, "node-two-key"),), "GetSlivers").encode()
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    connection.request("POST", "/PLCAPI/", body=body)
    answer = xmlrpc.client.loads(connection.getresponse().read(), use_builtin_types=True)[0][0]
    connection.close()
    doc, _ = parse_getslivers_with_protection(answer, expected_node_id=2)
    host = FakeHost()
    handler = ConfFilesHandler(host=host, store=None, base_url=f"http://127.0.0.1:{served.port}/",  # type: ignore[arg-type]
                               allowed_dirs=["/etc/nm"], fetch=HttpSourceFetcher(timeout=5))
    outcomes = handler.install_all(doc.members["conf_files"], doc.node_id)
    assert [(o.dest, o.state.value) for o in outcomes] == [("/etc/nm/motd", "installed"),
                                                             ("/etc/nm/sysctl.conf", "installed")]
    assert host.files[Path("/etc/nm/sysctl.conf")].data == b"net.x = 1\n"
    assert host.files[Path("/etc/nm/sysctl.conf")].mode == 0o600
    assert host.method_calls("run_shell") == [("run_shell", "echo done")]
    again = handler.install_all(doc.members["conf_files"], doc.node_id)
    assert {o.state.value for o in again} == {"unchanged"}
