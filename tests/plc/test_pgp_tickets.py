"""The bundled authority's OpenPGP tickets: ``nodemanager authority ticket SLICE --format pgp``.

Real ``gpg`` signs (a GnuPG key generated on first use next to the RSA key) and the node's real
``gpgv`` verifies against the exported public keyring.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import time
from pathlib import Path

import pytest

from nodemanager.core.errors import InvalidArgument
from nodemanager.pgptickets import GpgvVerifier, dearmor, load_ticket_keyring, plc_ticket
from nodemanager.plc.issue import password_digest
from nodemanager.plc.pgpsigning import pgp_paths
from nodemanager.plc.ticketcli import add_ticket_parser, cmd_authority_ticket
from nodemanager.testing.openpgp import missing_tools

pytestmark = pytest.mark.skipif(missing_tools("gpg", "gpgv", "gpgconf", "prlimit") is not None,
                                reason=str(missing_tools("gpg", "gpgv", "gpgconf", "prlimit")))

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPUu1j+SFdR6aTH02ad8zTIUcWRL3mwYxtpeUEMqQvvU dave@example.org"
MTIME = int(time.time()) - 1000

TOML = f"""
[[nodes]]
id = 1
key = "node-one-key"

[[slices]]
name = "site_ctrl"
id = 10
instantiation = "nm-controller"

[[slices]]
name = "site_deleg"
id = 11
instantiation = "delegated"
controller = "site_ctrl"
keys = ["{KEY}"]
initscript = "echo hi"
[slices.attributes]
nm_cpu_share = 4

[[users]]
name = "carol"
password_sha256 = "{password_digest("carol-secret")}"
slices = ["site_ctrl"]
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "authority.toml"
    path.write_text(TOML)
    os.utime(path, (MTIME, MTIME))
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    authority = parser.add_subparsers(dest="command").add_parser("authority")
    add_ticket_parser(authority.add_subparsers(dest="authority_command"))
    return parser.parse_args(["authority", *argv])


def test_cli_issues_a_plcapi_shaped_openpgp_ticket(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert cmd_authority_ticket(parse("ticket", "site_deleg", "--data", str(data), "--format", "pgp"), stdout=out) == 0
    text = out.getvalue()
    assert text.startswith("-----BEGIN PGP MESSAGE-----\n")
    home, public = pgp_paths(data)
    assert home == data.with_name("authority.toml.gnupg") and public == data.with_name("authority.toml.pgp-pub.gpg")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE(public.stat().st_mode) == 0o644
    assert str(public) in capsys.readouterr().err

    signer, content = GpgvVerifier(load_ticket_keyring(public)).verify(dearmor(text))
    assert not content.startswith(b"<?xml") and content.startswith(b"<methodResponse>")
    ticket = plc_ticket(content, signer)
    assert ticket.timestamp >= MTIME and ticket.signer == signer
    (sliver,) = ticket.slivers
    assert (sliver.name, sliver.slice_id, sliver.instantiation, sliver.keys) == ("site_deleg", 11, "delegated", (KEY,))
    assert ("delegations", "site_ctrl") in sliver.attributes and ("nm_cpu_share", "4") in sliver.attributes
    assert sliver.initscript == "echo hi"

    # the key is made once: a second ticket is signed by the same key
    out2 = io.StringIO()
    cmd_authority_ticket(parse("ticket", "site_deleg", "--data", str(data), "--format", "pgp"), stdout=out2)
    assert GpgvVerifier(load_ticket_keyring(public)).verify(dearmor(out2.getvalue()))[0] == signer
    assert list(home.parent.glob(".authority.toml.gnupg.*")) == []  # no staging directory left


def test_the_default_format_is_still_xml_dsig(data: Path) -> None:
    out = io.StringIO()
    assert cmd_authority_ticket(parse("ticket", "site_deleg", "--data", str(data)), stdout=out) == 0
    assert out.getvalue().startswith("<?xml")
    assert not pgp_paths(data)[0].exists()  # no GnuPG key made for an XML-DSig ticket


@pytest.mark.parametrize("extra", [("--node", "1"), ("--ttl", "1h")])
def test_an_openpgp_ticket_takes_no_node_and_no_ttl(data: Path, extra: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument, match="names no nodes and no expiry"):
        cmd_authority_ticket(parse("ticket", "site_deleg", "--data", str(data), "--format", "pgp", *extra),
                             stdout=io.StringIO())
