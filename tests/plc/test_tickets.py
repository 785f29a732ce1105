"""The bundled authority's tickets: signing identity, GetSliceTicket, the ticket CLI, validation."""

from __future__ import annotations

import argparse
import io
import os
import stat
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from nodemanager.authority.auth import hmac_auth
from nodemanager.core.errors import ConfigError, InvalidArgument, NotAllowedForSliver
from nodemanager.plc.issue import password_digest
from nodemanager.plc.model import load_authority_text, parse_duration, relative_expiry
from nodemanager.plc.server import AuthorityServer
from nodemanager.plc.signing import export_certificate, load_or_create_identity
from nodemanager.plc.ticketcli import (
    add_export_cert_option,
    add_ticket_parser,
    cmd_authority_ticket,
)
from nodemanager.tickets import load_ticket_certificate, verify_ticket

KEY_D = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPUu1j+SFdR6aTH02ad8zTIUcWRL3mwYxtpeUEMqQvvU dave@example.org"
MTIME = int(time.time()) - 1000  # the data file's mtime: relative expiries count from it

TOML = f"""
[authority]
ticket_lifetime = "2h"

[[nodes]]
id = 1
key = "node-one-key"

[[nodes]]
id = 2
key = "node-two-key"

[[nodes]]
id = 3
key = "node-three-key"

[[slices]]
name = "site_ctrl"
id = 10
instantiation = "nm-controller"
nodes = [1, 2]

[[slices]]
name = "site_deleg"
id = 11
instantiation = "delegated"
controller = "site_ctrl"
nodes = [1, 2]
keys = ["{KEY_D}"]
initscript = "echo hi"
[slices.attributes]
nm_cpu_share = 4
vsys = ["a", "b"]

[[slices]]
name = "site_everywhere"
id = 12
instantiation = "delegated"
controller = "site_ctrl"

[[slices]]
name = "site_plain"
id = 13

[[users]]
name = "carol"
password_sha256 = "{password_digest("carol-secret")}"
slices = ["site_ctrl"]

[[users]]
name = "dave"
password_sha256 = "{password_digest("dave-secret")}"
slices = ["site_everywhere", "site_plain"]
"""


def password_auth(user: str, password: str) -> dict[str, str]:
    return {"AuthMethod": "password", "Username": user, "AuthString": password}


@pytest.fixture
def authority_file(tmp_path: Path) -> Path:
    """This module's data file (overrides conftest's), dated ``MTIME``; conftest's ``authority``
    fixture serves it."""
    path = tmp_path / "authority.toml"
    path.write_text(TOML)
    os.utime(path, (MTIME, MTIME))
    return path


def call(authority: AuthorityServer, method: str, *params: Any) -> Any:
    proxy = xmlrpc.client.ServerProxy(authority.url)
    with proxy:
        return getattr(proxy, method)(*params)


def certificate(authority_file: Path, tmp_path: Path) -> Any:
    return load_ticket_certificate(export_certificate(authority_file, tmp_path / "exported.pem"))


# --- the signing identity ------------------------------------------------------------------------


def test_identity_is_generated_once_with_safe_modes(tmp_path: Path) -> None:
    key_path, cert_path = tmp_path / "a.key.pem", tmp_path / "a.cert.pem"
    first = load_or_create_identity(key_path, cert_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    assert first.key.key_size == 3072
    assert first.certificate.public_key() == first.key.public_key()
    again = load_or_create_identity(key_path, cert_path)
    assert again.certificate_pem() == first.certificate_pem()
    assert again.key.private_numbers() == first.key.private_numbers()
    assert set(tmp_path.iterdir()) == {key_path, cert_path}  # no temporary file left behind


def test_a_missing_certificate_is_remade_from_the_key(tmp_path: Path) -> None:
    key_path, cert_path = tmp_path / "k.pem", tmp_path / "c.pem"
    first = load_or_create_identity(key_path, cert_path)
    cert_path.unlink()
    again = load_or_create_identity(key_path, cert_path)
    assert again.certificate.public_key() == first.key.public_key()


def test_a_certificate_without_its_key_is_an_error(tmp_path: Path) -> None:
    key_path, cert_path = tmp_path / "k.pem", tmp_path / "c.pem"
    load_or_create_identity(key_path, cert_path)
    key_path.unlink()
    with pytest.raises(ConfigError, match="its key .* does not"):
        load_or_create_identity(key_path, cert_path)
    assert not key_path.exists()


def test_a_certificate_of_another_key_is_an_error(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path / "k1.pem", tmp_path / "c1.pem")
    load_or_create_identity(tmp_path / "k2.pem", tmp_path / "c2.pem")
    with pytest.raises(ConfigError, match="does not belong"):
        load_or_create_identity(tmp_path / "k1.pem", tmp_path / "c2.pem")


def test_configured_paths_are_relative_to_the_data_file(tmp_path: Path) -> None:
    path = tmp_path / "authority.toml"
    path.write_text('[authority]\nkey_file = "keys/sign.pem"\ncert_file = "/dev/null/x"\n')
    (tmp_path / "keys").mkdir()
    with pytest.raises(ConfigError, match="/dev/null/x"):
        export_certificate(path, tmp_path / "out.pem")
    path.write_text(f'[authority]\nkey_file = "keys/sign.pem"\ncert_file = "{tmp_path / "sign.crt"}"\n')
    export_certificate(path, tmp_path / "out.pem")
    assert (tmp_path / "keys" / "sign.pem").exists()
    assert (tmp_path / "out.pem").read_bytes() == (tmp_path / "sign.crt").read_bytes()


def test_export_certificate_defaults_next_to_the_data_file(authority_file: Path, tmp_path: Path) -> None:
    out = export_certificate(authority_file, tmp_path / "authority.pem")
    assert out.read_bytes() == (tmp_path / "authority.toml.cert.pem").read_bytes()
    assert stat.S_IMODE((tmp_path / "authority.toml.key.pem").stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((tmp_path / "authority.toml.key.pem").read_bytes(), None)
    assert load_ticket_certificate(out).public_key() == key.public_key()


# --- GetSliceTicket --------------------------------------------------------------------------------


def test_a_controller_member_gets_a_verifiable_ticket(authority: AuthorityServer, authority_file: Path,
                                                      tmp_path: Path) -> None:
    before = int(time.time())
    ticket = call(authority, "GetSliceTicket", password_auth("carol", "carol-secret"), "site_deleg")
    data = verify_ticket(ticket, certificate(authority_file, tmp_path))
    assert (data.slice_name, data.slice_id, data.instantiation, data.controller) == (
        "site_deleg", 11, "delegated", "site_ctrl")
    assert data.node_ids == (1, 2)
    assert data.keys == (KEY_D,)
    assert data.attributes == (("nm_cpu_share", "4"), ("vsys", "a"), ("vsys", "b"), ("initscript_code", "echo hi"))
    assert data.initscript == "echo hi"
    assert before <= data.issued <= int(time.time()) + 1
    assert data.expires == data.issued + 7200
    assert data.slice_expires == relative_expiry(MTIME, 30 * 86400)


def test_issued_increases_and_is_never_older_than_the_data(authority: AuthorityServer, authority_file: Path,
                                                           tmp_path: Path) -> None:
    cert = certificate(authority_file, tmp_path)
    auth = password_auth("carol", "carol-secret")
    authority.clock = lambda: MTIME - 1000.0  # a clock behind the data file's timestamp
    first = verify_ticket(call(authority, "GetSliceTicket", auth, "site_deleg"), cert)
    second = verify_ticket(call(authority, "GetSliceTicket", auth, "site_deleg"), cert)
    assert first.issued == authority.data().timestamp
    assert second.issued == first.issued + 1
    assert first.ticket_id != second.ticket_id


def test_a_slice_on_every_node_lists_every_node(authority: AuthorityServer, authority_file: Path,
                                                tmp_path: Path) -> None:
    ticket = call(authority, "GetSliceTicket", password_auth("dave", "dave-secret"), "site_everywhere")
    assert verify_ticket(ticket, certificate(authority_file, tmp_path)).node_ids == (1, 2, 3)


@pytest.mark.parametrize(
    ("auth", "slice_name", "code", "message"),
    [
        (password_auth("carol", "wrong"), "site_deleg", 108, "authentication failed"),
        (password_auth("mallory", "carol-secret"), "site_deleg", 108, "authentication failed"),
        ({"AuthMethod": "password", "Username": "carol"}, "site_deleg", 108, "authentication failed"),
        ({"AuthMethod": "anonymous"}, "site_deleg", 108, "password"),
        (hmac_auth(1, "node-one-key", []), "site_deleg", 108, "password"),
        (password_auth("dave", "dave-secret"), "site_deleg", 108, "may not get tickets"),
        (password_auth("dave", "dave-secret"), "site_plain", 104, "delegated"),
        (password_auth("carol", "carol-secret"), "site_ctrl", 104, "delegated"),
        (password_auth("carol", "carol-secret"), "site_nothing", 102, "no slice"),
    ],
    ids=["bad-password", "unknown-user", "no-password", "not-password-auth", "node-auth", "not-a-member",
         "not-delegated", "controller-itself", "unknown-slice"],
)
def test_get_slice_ticket_refusals(authority: AuthorityServer, auth: Any, slice_name: str, code: int,
                                   message: str) -> None:
    with pytest.raises(xmlrpc.client.Fault) as caught:
        call(authority, "GetSliceTicket", auth, slice_name)
    assert caught.value.faultCode == code
    assert message in caught.value.faultString


def test_get_slice_ticket_argument_count(authority: AuthorityServer) -> None:
    with pytest.raises(xmlrpc.client.Fault) as caught:
        call(authority, "GetSliceTicket", password_auth("carol", "carol-secret"))
    assert caught.value.faultCode == 101


# --- the CLI -------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    authority = parser.add_subparsers(dest="command").add_parser("authority")
    subparsers = authority.add_subparsers(dest="authority_command")
    add_ticket_parser(subparsers)
    add_export_cert_option(subparsers.add_parser("serve"))
    return parser.parse_args(["authority", *argv])


def test_cli_prints_a_ticket(authority_file: Path, tmp_path: Path) -> None:
    args = parse("ticket", "site_deleg", "--data", str(authority_file), "--node", "2", "--ttl", "90m")
    assert args.handler is cmd_authority_ticket
    out = io.StringIO()
    assert cmd_authority_ticket(args, stdout=out) == 0
    data = verify_ticket(out.getvalue(), certificate(authority_file, tmp_path))
    assert data.node_ids == (2,) and data.expires == data.issued + 5400
    assert data.issued >= MTIME


def test_cli_writes_a_private_output_file(authority_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "ticket.xml"
    argv = parse("ticket", "site_deleg", "--data", str(authority_file), "--output", str(target))
    assert cmd_authority_ticket(argv) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert verify_ticket(target.read_text(), certificate(authority_file, tmp_path)).node_ids == (1, 2)


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (("site_deleg", "--node", "3"), InvalidArgument, "not on node"),
        (("site_plain",), NotAllowedForSliver, "delegated"),
        (("site_deleg", "--ttl", "soon"), ConfigError, "--ttl"),
        (("site_nothing",), InvalidArgument, "no slice"),
    ],
)
def test_cli_refusals(authority_file: Path, argv: tuple[str, ...], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        cmd_authority_ticket(parse("ticket", *argv, "--data", str(authority_file)), stdout=io.StringIO())


def test_serve_export_cert_option(authority_file: Path) -> None:
    args = parse("serve", "--export-cert", "/x/authority.pem")
    assert args.export_cert == Path("/x/authority.pem")


# --- data file validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[users]]\nname = "eve"\npassword_sha256 = "abc"\n', "users[0] ('eve').password_sha256"),
        (f'[[users]]\nname = "eve"\npassword_sha256 = "{"0" * 64}"\nslices = ["site_nope"]\n', "unknown slice"),
        (f'[[users]]\nname = "e v"\npassword_sha256 = "{"0" * 64}"\n', "users[0] ('e v').name"),
        ('[authority]\nticket_lifetime = "forever"\n', "authority.ticket_lifetime"),
        ('[authority]\nticket_lifetime = 0\n', "authority.ticket_lifetime"),
    ],
)
def test_bad_ticket_settings_are_refused(extra: str, message: str) -> None:
    text = '[[slices]]\nname = "site_a"\nid = 1\n' + extra
    with pytest.raises(ConfigError) as caught:
        load_authority_text(text, timestamp=1, base_time=1, origin="test.toml")
    assert message in str(caught.value)


@pytest.mark.parametrize(("text", "seconds"), [("3600", 3600), ("12h", 43200), ("+1d", 86400), ("2w", 1209600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
