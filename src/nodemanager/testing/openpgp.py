"""OpenPGP helpers for tests: real GnuPG keys and tickets made the way PLCAPI makes them.

* :func:`gpg1_dsa_key` -- a DSA-1024 key in a GnuPG-1 keyring (``gpg1 --batch --gen-key``), as
  stock MyPLC's ``PLC_ROOT_GPG_KEY``;
* :func:`gpg2_key` -- a modern key made by GnuPG 2 (ed25519 by default);
* :func:`sign` -- ``gpg --batch --no-tty --armor --sign`` (or any other ``gpg`` mode) in a home;
* :func:`plc_content` -- ``xmlrpc.client.dumps((struct,), methodresponse=True)`` without its
  XML declaration, as PLCAPI's ``GetSliceTicket`` signs it;
* :func:`split_packets`, :func:`literal_packet`, :func:`armor` -- enough packet surgery to build
  hostile messages (a second literal data packet, a tampered body) from real ones.

GnuPG 2 starts a ``gpg-agent`` per home: :func:`sign` and :func:`gpg2_key` stop it afterwards.
Programs missing from the machine make :func:`missing_tools` name them (for ``skipif``).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..pgptickets import _crc24

__all__ = [
    "armor", "export_public", "gpg1_dsa_key", "gpg2_key", "literal_packet", "missing_tools",
    "plc_content", "sign", "split_packets",
]

_DSA_1024 = """Key-Type: DSA
Key-Length: 1024
Name-Real: {name}
Name-Email: {email}
Expire-Date: 0
%no-protection
%commit
"""
_ED25519 = """Key-Type: EDDSA
Key-Curve: ed25519
Key-Usage: sign
Name-Real: {name}
Name-Email: {email}
Expire-Date: 0
%no-protection
%commit
"""


def missing_tools(*names: str) -> str | None:
    """A skip reason naming the programs that are not installed, or None."""
    missing = [name for name in names if shutil.which(name) is None]
    return f"needs {', '.join(missing)} (Debian: gpgv gnupg gnupg1)" if missing else None


def _home(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _kill_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=False)


def _fingerprint(gpg: str, home: Path, email: str) -> str:
    listing = subprocess.run([gpg, "--homedir", str(home), "--batch", "--with-colons", "--fingerprint",
                              email], capture_output=True, check=True).stdout.decode()
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def gpg1_dsa_key(home: Path, name: str = "PlanetLab Central", email: str = "root@plc.example.org") -> str:
    """Generate a DSA-1024 key in the GnuPG-1 home ``home`` (created 0700); its fingerprint."""
    _home(home)
    subprocess.run(["gpg1", "--homedir", str(home), "--batch", "--gen-key"],
                   input=_DSA_1024.format(name=name, email=email).encode(), capture_output=True, check=True)
    return _fingerprint("gpg1", home, email)


def gpg2_key(home: Path, name: str, email: str, parameters: str = _ED25519) -> str:
    """Generate a key with GnuPG 2 in ``home`` (created 0700); its fingerprint."""
    _home(home)
    try:
        subprocess.run(["gpg", "--homedir", str(home), "--batch", "--gen-key"],
                       input=parameters.format(name=name, email=email).encode(), capture_output=True, check=True)
        return _fingerprint("gpg", home, email)
    finally:
        _kill_agent(home)


def export_public(gpg: str, home: Path, *fingerprints: str, armored: bool = False) -> bytes:
    """The public keys ``fingerprints`` of ``home`` as a keyring (binary, or an armored block)."""
    argv = [gpg, "--homedir", str(home), "--batch", *(["--armor"] if armored else []), "--export", *fingerprints]
    try:
        return subprocess.run(argv, capture_output=True, check=True).stdout
    finally:
        if gpg == "gpg":
            _kill_agent(home)


def sign(home: Path, content: bytes, *, gpg: str = "gpg", users: Sequence[str] = (),
         mode: Sequence[str] = ("--armor", "--sign"), extra: Sequence[str] = ()) -> bytes:
    """``gpg --batch --no-tty <mode>`` of ``content`` in ``home`` (with ``--local-user`` for each
    of ``users``; none: the home's default key) -- PLCAPI's ``gpg --batch --no-tty --armor --sign``
    by default. The content is given as a file so that the literal data has a definite length."""
    source = home / "content.in"
    source.write_bytes(content)
    locals_ = [arg for user in users for arg in ("--local-user", user)]
    argv = [gpg, "--homedir", str(home), "--batch", "--no-tty", *locals_, *extra, *mode, "--output", "-",
            str(source)]
    try:
        return subprocess.run(argv, capture_output=True, check=True).stdout
    finally:
        source.unlink()
        if gpg == "gpg":
            _kill_agent(home)


def plc_content(struct: dict[str, Any]) -> bytes:
    """What PLCAPI signs: the XML-RPC methodResponse of ``struct`` without an XML declaration."""
    text = xmlrpc.client.dumps((struct,), methodresponse=True)
    return text.removeprefix("<?xml version='1.0'?>\n").encode("utf-8")


def split_packets(data: bytes) -> list[bytes]:
    """The OpenPGP packets of ``data``, each with its header (definite lengths only)."""
    packets, offset = [], 0
    while offset < len(data):
        tag = data[offset]
        if not tag & 0x80:
            raise ValueError(f"no packet at offset {offset}")
        if tag & 0x40:  # new format
            first = data[offset + 1]
            if first < 192:
                header, length = 2, first
            elif first < 224:
                header, length = 3, ((first - 192) << 8) + data[offset + 2] + 192
            elif first == 255:
                header, length = 6, int.from_bytes(data[offset + 2:offset + 6], "big")
            else:
                raise ValueError("partial body lengths are not supported")
        else:
            kind = tag & 0x03
            if kind == 3:
                raise ValueError("indeterminate lengths are not supported")
            size = 1 << kind
            header, length = 1 + size, int.from_bytes(data[offset + 1:offset + 1 + size], "big")
        packets.append(data[offset:offset + header + length])
        offset += header + length
    return packets


def packet_tag(packet: bytes) -> int:
    """The packet type of one packet (11: literal data, 4: one-pass signature, 2: signature...)."""
    return packet[0] & 0x3F if packet[0] & 0x40 else (packet[0] >> 2) & 0x0F


def literal_packet(content: bytes, timestamp: int = 0) -> bytes:
    """A binary literal data packet (new format, definite length) holding ``content``."""
    body = b"b\x00" + timestamp.to_bytes(4, "big") + content
    if len(body) < 192:
        header = bytes([0xC0 | 11, len(body)])
    else:
        header = bytes([0xC0 | 11, 0xFF]) + len(body).to_bytes(4, "big")
    return header + body


def armor(packets: bytes, label: str = "PGP MESSAGE") -> str:
    """ASCII armor of ``packets`` with its CRC-24 (as ``gpg --enarmor`` would)."""
    text = base64.b64encode(packets).decode()
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    crc = base64.b64encode(_crc24(packets).to_bytes(3, "big")).decode()
    return "\n".join([f"-----BEGIN {label}-----", "", *lines, f"={crc}", f"-----END {label}-----", ""])
