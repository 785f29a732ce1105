"""The API clients: UnixTransport/TCP against a small real XML-RPC server written here, and the
SSH transport's error mapping against a FAKE ``ssh`` program placed first on PATH.

The fake ssh (``fake_ssh`` below) is not OpenSSH: it records its argv, reads the request from
stdin and behaves as ``FAKE_SSH_MODE`` says (answer, fault, fail like ssh does, hang...). The real
sshd is exercised in tests/integration/test_ssh_api.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socketserver
import sys
import threading
import xmlrpc.client
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodemanager.api import callcli
from nodemanager.api.client import (
    MalformedResponse,
    SshTransport,
    SshTransportError,
    XmlRpcOverSsh,
    loads_response,
    local_proxy,
    tcp_proxy,
)

BOMB = b"""<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>
<methodResponse><params><param><value><string>&b;</string></value></param></params></methodResponse>"""


class _Handler(BaseHTTPRequestHandler):
    """Answers XML-RPC: Echo(*args) -> list of args, Boom() -> Fault 104, Garbage/Bomb -> bad bodies."""

    protocol_version = "HTTP/1.1"
    server: Any

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        params, method = xmlrpc.client.loads(body)
        self.server.calls.append((method, params))
        if method == "Echo":
            answer = xmlrpc.client.dumps((list(params),), methodresponse=True).encode()
        elif method == "Boom":
            answer = xmlrpc.client.dumps(xmlrpc.client.Fault(104, "it broke"), methodresponse=True).encode()
        elif method == "Bomb":
            answer = BOMB
        else:
            answer = b"<html>not xml-rpc"
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        super().__init__(path, _Handler)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.connections = 0

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = super().get_request()
        self.connections += 1
        return conn, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) address


ServerT = TypeVar("ServerT", bound=socketserver.BaseServer)


def serving(server: ServerT) -> Iterator[ServerT]:
    """Run ``server`` in a thread until the generator is closed (a fixture's teardown)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[_UnixServer]:
    yield from serving(_UnixServer(str(tmp_path / "api.sock")))


@pytest.fixture
def tcp_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.calls = []  # type: ignore[attr-defined]
    yield from serving(server)


# --- HTTP transports ---------------------------------------------------------------------------
def test_unix_proxy_calls_and_keeps_one_connection(unix_server: _UnixServer) -> None:
    with local_proxy(unix_server.server_address) as api:
        assert api.Echo("site_a", 3, [1, "x"], {"k": True}) == ["site_a", 3, [1, "x"], {"k": True}]
        assert api.Echo() == []
    assert unix_server.calls[0] == ("Echo", ("site_a", 3, [1, "x"], {"k": True}))
    assert unix_server.connections == 1


def test_unix_proxy_faults_stay_faults(unix_server: _UnixServer) -> None:
    with pytest.raises(xmlrpc.client.Fault) as caught, local_proxy(unix_server.server_address) as api:
        api.Boom()
    assert (caught.value.faultCode, caught.value.faultString) == (104, "it broke")


@pytest.mark.parametrize("method", ["Garbage", "Bomb"])
def test_bad_response_bodies_are_refused(unix_server: _UnixServer, method: str) -> None:
    with pytest.raises(MalformedResponse, match="malformed XML-RPC response"), \
            local_proxy(unix_server.server_address) as api:
        getattr(api, method)()


def test_missing_socket_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), local_proxy(tmp_path / "none.sock") as api:
        api.Echo()


def test_tcp_proxy(tcp_server: ThreadingHTTPServer) -> None:
    host, port = tcp_server.server_address[:2]
    with tcp_proxy(f"{host}:{port}") as api:
        assert api.Echo("x") == ["x"]
    with pytest.raises(ValueError):
        tcp_proxy("no-port-here")


def test_loads_response_refuses_method_calls_and_dtds() -> None:
    assert loads_response(xmlrpc.client.dumps((5,), methodresponse=True).encode()) == (5,)
    with pytest.raises(MalformedResponse):
        loads_response(xmlrpc.client.dumps((5,), "GetXIDs").encode())
    with pytest.raises(MalformedResponse):
        loads_response(BOMB)
    with pytest.raises(MalformedResponse):
        loads_response(b"<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>")


# --- the FAKE ssh ------------------------------------------------------------------------------
FAKE_SSH = '''#!{python}
"""FAKE ssh for tests (not OpenSSH): records argv, reads stdin, acts as FAKE_SSH_MODE says."""
import json, os, sys, time, xmlrpc.client
mode = os.environ.get("FAKE_SSH_MODE", "answer")
record = os.environ["FAKE_SSH_RECORD"]
request = sys.stdin.buffer.read()
with open(record, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin_bytes": len(request)}}) + "\\n")
out = sys.stdout.buffer
if mode == "answer":
    params, method = xmlrpc.client.loads(request)
    out.write(xmlrpc.client.dumps(({{"method": method, "params": list(params)}},), methodresponse=True).encode())
elif mode == "fault":
    out.write(xmlrpc.client.dumps(xmlrpc.client.Fault(108, "permission denied"), methodresponse=True).encode())
elif mode == "forward-down":
    sys.stderr.write("forward_api_calls: cannot reach the node manager API\\n")
    fault = xmlrpc.client.Fault(1, "cannot reach the node manager API")
    out.write(xmlrpc.client.dumps(fault, methodresponse=True).encode())
    sys.exit(2)
elif mode == "denied":
    sys.stderr.write("ctl@node: Permission denied (publickey).\\n")
    sys.exit(255)
elif mode == "refused-command":
    sys.stderr.write("forward_api_calls: this account only speaks XML-RPC over SSH\\n")
    sys.exit(1)
elif mode == "motd":
    out.write(b"Welcome to Debian!\\n" + xmlrpc.client.dumps((1,), methodresponse=True).encode())
elif mode == "bomb":
    out.write({bomb!r})
elif mode == "flood":
    chunk = b"x" * 65536
    for _ in range(64):
        out.write(chunk)
elif mode == "hang":
    time.sleep(30)
'''


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A FAKE ``ssh`` first on PATH; returns the file where it records its calls."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    program = bin_dir / "ssh"
    program.write_text(FAKE_SSH.format(python=sys.executable, bomb=BOMB))
    program.chmod(0o755)
    record = tmp_path / "fake-ssh-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_SSH_RECORD", str(record))
    monkeypatch.setenv("FAKE_SSH_MODE", "answer")
    return record


def calls_of(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_over_ssh_call_style_argv_and_body(fake_ssh: Path) -> None:
    api = XmlRpcOverSsh("ctl@node.example", ssh_options=["-p", "2222", "-i", "/k"])
    assert api.GetRSpec("site_a") == {"method": "GetRSpec", "params": ["site_a"]}
    (call,) = calls_of(fake_ssh)
    assert call["argv"] == ["-p", "2222", "-i", "/k", "-T", "-o", "BatchMode=yes", "--", "ctl@node.example"]
    assert call["stdin_bytes"] == len(xmlrpc.client.dumps(("site_a",), "GetRSpec").encode())
    assert repr(api) == "<XmlRpcOverSsh for ctl@node.example>"


def test_large_requests_are_delivered_whole(fake_ssh: Path) -> None:
    big = "z" * (900 * 1024)
    assert XmlRpcOverSsh("ctl@node").Echo(big)["params"] == [big]
    assert calls_of(fake_ssh)[0]["stdin_bytes"] > 900 * 1024


def test_batch_mode_can_be_turned_off(fake_ssh: Path) -> None:
    assert SshTransport("u@h", batch_mode=False).argv() == ["ssh", "-T", "--", "u@h"]
    XmlRpcOverSsh("u@h", batch_mode=False).Help()
    assert "BatchMode=yes" not in calls_of(fake_ssh)[0]["argv"]


@pytest.mark.parametrize(("mode", "code"), [("fault", 108), ("forward-down", 1)])
def test_faults_stay_faults(fake_ssh: Path, monkeypatch: pytest.MonkeyPatch, mode: str, code: int) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", mode)
    with pytest.raises(xmlrpc.client.Fault) as caught:
        XmlRpcOverSsh("ctl@node").GetXIDs()
    assert caught.value.faultCode == code


@pytest.mark.parametrize(("mode", "returncode", "words"), [
    ("denied", 255, "Permission denied (publickey)"),
    ("refused-command", 1, "no answer"),
    ("motd", 0, "did not answer with XML-RPC"),
    ("bomb", 0, "did not answer with XML-RPC"),
])
def test_ssh_failures_become_ssh_transport_errors(fake_ssh: Path, monkeypatch: pytest.MonkeyPatch,
                                                  mode: str, returncode: int, words: str) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", mode)
    with pytest.raises(SshTransportError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        XmlRpcOverSsh("ctl@node").GetXIDs()
    assert caught.value.returncode == returncode
    if mode in ("denied", "refused-command"):
        assert caught.value.stderr  # ssh's stderr tail travels with the exception


def test_timeout_kills_ssh(fake_ssh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", "hang")
    with pytest.raises(SshTransportError, match="timed out after 0.5s"):
        XmlRpcOverSsh("ctl@node", timeout=0.5).GetXIDs()


def test_output_is_bounded(fake_ssh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MODE", "flood")
    transport = SshTransport("ctl@node", max_response_bytes=100_000)
    with pytest.raises(SshTransportError, match="larger than 100000 bytes"):
        xmlrpc.client.ServerProxy("http://x/", transport=transport).GetXIDs()


def test_missing_ssh_program_is_an_ssh_transport_error(tmp_path: Path) -> None:
    with pytest.raises(SshTransportError, match="cannot run"):
        XmlRpcOverSsh("ctl@node", ssh_command=str(tmp_path / "no-ssh")).GetXIDs()


# --- nodemanager call --------------------------------------------------------------------------
def call(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("-c", "--config", default=None)
    callcli.add_call_parser(parser.add_subparsers(dest="command"))
    front = list(argv[:2]) if argv[:1] == ("--config",) else []
    args = parser.parse_args([*front, "call", *argv[len(front):]])
    out, err = io.StringIO(), io.StringIO()
    status = callcli.cmd_call(args, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_parse_argument_json_or_literal() -> None:
    assert callcli.parse_argument("site_alpha") == "site_alpha"
    assert callcli.parse_argument('[["site_b","nm_cpu_share",1]]') == [["site_b", "nm_cpu_share", 1]]
    assert callcli.parse_argument("12") == 12
    assert callcli.parse_argument('"12"') == "12"
    assert callcli.parse_argument('{"a": 1}') == {"a": 1}
    assert callcli.parse_argument("null") == "null"
    assert callcli.parse_argument("[unclosed") == "[unclosed"


def test_call_over_the_socket_pretty_and_json(unix_server: _UnixServer) -> None:
    status, out, err = call("--socket", unix_server.server_address, "Echo", "site_a",
                            '[["site_b","nm_cpu_share",1]]')
    assert (status, err) == (0, "")
    assert unix_server.calls[-1] == ("Echo", ("site_a", [["site_b", "nm_cpu_share", 1]]))
    assert out == "site_a\n" + json.dumps([["site_b", "nm_cpu_share", 1]]) + "\n"
    status, out, _ = call("--socket", unix_server.server_address, "--json", "Echo", "7")
    assert status == 0 and json.loads(out) == [7]


def test_call_fault_prints_fault_and_exits_1(unix_server: _UnixServer) -> None:
    assert call("--socket", unix_server.server_address, "Boom") == (1, "", "Fault 104: it broke\n")


def test_call_transport_errors_exit_2(tmp_path: Path, fake_ssh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status, out, err = call("--socket", str(tmp_path / "none.sock"), "GetXIDs")
    assert (status, out) == (2, "") and "No such file or directory" in err
    monkeypatch.setenv("FAKE_SSH_MODE", "denied")
    status, out, err = call("--ssh", "ctl@node", "GetXIDs")
    assert (status, out) == (2, "") and "Permission denied (publickey)" in err
    status, _, err = call("--tcp", "nonsense", "GetXIDs")
    assert status == 2 and "HOST:PORT" in err
    status, _, err = call("--socket", str(tmp_path / "none.sock"), "Echo", str(2**40))
    assert status == 2 and "cannot send" in err


def test_call_over_ssh_needs_no_configuration(fake_ssh: Path) -> None:
    status, out, err = call("--config", "/nonexistent/nodemanager.toml", "--ssh", "ctl@node",
                            "--ssh-option=-p", "--ssh-option=2222", "GetLoans", "site_a")
    assert (status, err) == (0, "")
    assert out == "method  GetLoans\nparams  [\"site_a\"]\n"
    assert calls_of(fake_ssh)[0]["argv"][:2] == ["-p", "2222"]


def test_call_default_socket_comes_from_the_configuration(tmp_path: Path, unix_server: _UnixServer) -> None:
    config = tmp_path / "nm.toml"
    config.write_text(f'[api]\nunix_socket = "{unix_server.server_address}"\n')
    status, out, _ = call("--config", str(config), "Echo", "x")
    assert (status, out) == (0, "x\n")
    config.write_text('[api]\nunix_socket = ""\n')
    status, _, err = call("--config", str(config), "Echo")
    assert status == 2 and "api.unix_socket is disabled" in err
    status, _, err = call("--config", str(tmp_path / "missing.toml"), "Echo")
    assert status == 2 and "cannot read configuration file" in err


def test_render_shapes() -> None:
    assert callcli.render({"site_b": 1001, "site_a": 1000}) == "site_a  1000\nsite_b  1001\n"
    assert callcli.render({"site_a": "key1\nkey2\n"}) == "site_a:\n    key1\n    key2\n"
    assert callcli.render([["site_b", "cpu", 10], ["site_cc", "net", 2]]) == "site_b   cpu  10\nsite_cc  net  2\n"
    assert callcli.render([]) == "(empty)\n" and callcli.render({}) == "(empty)\n"
    assert callcli.render(1) == "1\n" and callcli.render(True) == "true\n"
    assert callcli.render("Help(): text\n") == "Help(): text\n"
