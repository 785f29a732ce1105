"""PLCAPI's OpenPGP tickets (tickets.md, second format): armor, ``gpgv``, and the signed content.

A real PLCAPI's ``GetSliceTicket`` returns an ASCII-armored OpenPGP *signed message* (``gpg --armor
--sign``: one-pass signature, literal data, signature; usually compressed) whose literal data is an
XML-RPC ``methodResponse`` carrying ``{timestamp, initscripts, slivers}``. This module turns such a
ticket into a :class:`~nodemanager.core.tickets.PlcTicket`, trusting nothing the signature does not
cover:

1. :func:`dearmor` -- strict, pure Python: exactly one ``-----BEGIN PGP MESSAGE-----`` block and
   nothing around it (a clearsigned ``-----BEGIN PGP SIGNED MESSAGE-----`` or a detached
   ``-----BEGIN PGP SIGNATURE-----`` is refused here, before any verifier runs), armor headers,
   strict base64, the CRC-24 when present. ``gpgv`` then gets the binary packets, so there is one
   armor parser and no leniency to exploit (text before the armor, two armored blocks...).
2. :class:`GpgvVerifier` -- GnuPG's ``gpgv`` (see ``docs/pgp-tickets.md`` for why ``gpgv``): a
   fixed argument list through :meth:`nodemanager.host.Host.run` (no shell), a private temporary
   home directory holding the keyring copy, the ticket and gpgv's outputs, a timeout, and
   ``prlimit --fsize`` so that neither the decompressed content nor the status output can grow
   past the cap (a compression bomb kills gpgv with SIGXFSZ). Its ``--status-fd`` lines must be
   exactly one ``NEWSIG``, ``GOODSIG``, ``VALIDSIG`` and ``PLAINTEXT`` and nothing outside a short
   allow-list (so ``BADSIG``, ``ERRSIG``, ``NO_PUBKEY``, ``EXPKEYSIG``, ``NODATA``... all refuse),
   and gpgv must exit 0. The content is read ONLY from gpgv's ``--output`` file.
3. :func:`plc_ticket` -- the content through the hardened streaming XML-RPC decoder
   (``authority.safe_xml.loads_xmlrpc_response``: no DTD, depth and size caps) and the GetSlivers
   sliver validation of ``authority.parse`` (one validation for both paths). Any bad sliver
   rejects the whole ticket.

Every failure is ``TicketRejected`` (Fault 102). The node rules are :func:`core.tickets.check_plc_ticket`.
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .authority.parse import _check_sliver, _initscript_table
from .authority.safe_xml import loads_xmlrpc_response
from .core.errors import AuthorityError, ConfigError, NodeManagerError, TicketReason, TicketRejected
from .core.records import Sliver
from .core.tickets import PlcTicket
from .host import COMMAND_ENV, Host

__all__ = [
    "MAX_CONTENT_BYTES",
    "MAX_PGP_TICKET_BYTES",
    "GpgvVerifier",
    "dearmor",
    "is_openpgp_ticket",
    "judge_status",
    "load_ticket_keyring",
    "plc_ticket",
]

#: Caps, as for XML-DSig tickets: the armored ticket, and the signed content gpgv writes out.
MAX_PGP_TICKET_BYTES = 256 * 1024
MAX_CONTENT_BYTES = 256 * 1024
#: gpgv's status output is small (a dozen lines); anything near this is hostile.
MAX_STATUS_BYTES = 64 * 1024
MAX_KEYRING_BYTES = 1024 * 1024
GPGV_TIMEOUT = 10.0

MESSAGE = "PGP MESSAGE"
PUBLIC_KEY = "PGP PUBLIC KEY BLOCK"
_ARMOR_LINE = re.compile(r"-----(BEGIN|END) ([A-Z0-9 ,/]{1,40})-----")
_HEADER = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}: [\x20-\x7e]{0,200}")
_WHY_NOT = {
    "PGP SIGNED MESSAGE": "a clearsigned message is not a ticket (PLCAPI tickets are `gpg --armor --sign` messages)",
    "PGP SIGNATURE": "a detached signature is not a ticket (PLCAPI tickets are `gpg --armor --sign` messages)",
}
#: Status keywords a good single-signature verification prints (gpgv 2.2); any other refuses.
_ALLOWED_STATUS = frozenset({
    "NEWSIG", "KEY_CONSIDERED", "SIG_ID", "GOODSIG", "VALIDSIG", "PLAINTEXT", "PLAINTEXT_LENGTH",
    "VERIFICATION_COMPLIANCE_MODE",
})
_EXACTLY_ONCE = ("NEWSIG", "GOODSIG", "VALIDSIG", "PLAINTEXT")
_FINGERPRINT = re.compile(r"[0-9A-F]{32,64}")


def _rejected(detail: str) -> TicketRejected:
    return TicketRejected(TicketReason.MALFORMED, detail)


def is_openpgp_ticket(ticket: str | bytes) -> bool:
    """The ticket is (meant as) OpenPGP armor: it does not start (after white space) with ``<``
    like an XML ticket, and its first 4 KiB hold ``-----BEGIN PGP``. (Text around the armor is then
    refused by :func:`dearmor` with a clear reason.)"""
    head = ticket[:4096] if isinstance(ticket, str) else ticket[:4096].decode("latin-1")
    return not head.lstrip().startswith("<") and "-----BEGIN PGP" in head


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def dearmor(text: str | bytes, label: str = MESSAGE) -> bytes:
    """The binary packets of ONE ASCII-armored ``label`` block (RFC 4880 section 6), strictly: only
    white space around the block, armor headers then an empty line, strict base64, and the CRC-24
    checked when present. Raises ``TicketRejected(MALFORMED)`` naming the problem."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise _rejected("OpenPGP armor must be ASCII") from None
    elif not text.isascii():
        raise _rejected("OpenPGP armor must be ASCII")
    lines = [line.rstrip(" \t\r") for line in text.strip().split("\n")]
    begin = _ARMOR_LINE.fullmatch(lines[0]) if lines else None
    if begin is None or begin.group(1) != "BEGIN":
        raise _rejected("not an ASCII-armored OpenPGP block")
    if begin.group(2) != label:
        why = _WHY_NOT.get(begin.group(2), f"a {begin.group(2)!r} block is not a {label!r}")
        raise _rejected(why if label == MESSAGE else f"a {begin.group(2)!r} block is not a {label!r}")
    if lines[-1] != f"-----END {label}-----" or len(lines) < 3:
        raise _rejected(f"the armor must end with -----END {label}----- and hold nothing after it")
    index = 1
    while lines[index] and _HEADER.fullmatch(lines[index]):
        index += 1
        if index >= len(lines) - 1:
            raise _rejected("the armor has no body")
    if lines[index]:
        raise _rejected("the armor headers must be followed by an empty line")
    body = lines[index + 1:-1]
    checksum = None
    if body and body[-1].startswith("="):
        checksum, body = body[-1][1:], body[:-1]
    if any(line.startswith("-----") for line in body):
        raise _rejected("the armor holds more than one block")
    try:
        data = base64.b64decode("".join(body), validate=True)
    except (binascii.Error, ValueError):
        raise _rejected("the armor's body is not valid base64") from None
    if not data:
        raise _rejected("the armor's body is empty")
    if checksum is not None:
        try:
            expected = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            raise _rejected("the armor's checksum line is not valid base64") from None
        if len(expected) != 3 or int.from_bytes(expected, "big") != _crc24(data):
            raise _rejected("the armor's CRC-24 checksum does not match its body")
    return data


def load_ticket_keyring(path: Path) -> bytes:
    """The OpenPGP public key(s) of ``authority.ticket_keyring`` as binary packets for gpgv: a
    binary keyring (``.gpg`` export or ``.kbx``) as is, an ASCII-armored public key block
    dearmored. ``ConfigError`` if unreadable, empty, too large or not OpenPGP."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"authority.ticket_keyring {path}: cannot read: {exc.strerror}") from exc
    if not raw or len(raw) > MAX_KEYRING_BYTES:
        raise ConfigError(f"authority.ticket_keyring {path}: empty or over {MAX_KEYRING_BYTES} bytes")
    if raw.lstrip().startswith(b"-----BEGIN"):
        try:
            return dearmor(raw, PUBLIC_KEY)
        except TicketRejected as exc:
            raise ConfigError(f"authority.ticket_keyring {path}: {exc}") from None
    if raw[0] & 0x80 or raw[8:12] == b"KBXf":  # an OpenPGP packet, or a keybox's first blob
        return raw
    raise ConfigError(f"authority.ticket_keyring {path}: neither an OpenPGP keyring nor an armored public key")


def judge_status(status: bytes, returncode: int) -> str:
    """The signer's primary-key fingerprint from gpgv's ``--status-fd`` output, if it shows
    exactly one good signature over exactly one literal data packet; else ``TicketRejected``."""
    seen: dict[str, list[list[str]]] = {}
    for raw in status.decode("utf-8", "replace").splitlines():
        if not raw.startswith("[GNUPG:] "):
            raise TicketRejected(TicketReason.SIGNATURE, "gpgv printed an unexpected status line")
        words = raw[len("[GNUPG:] "):].split(" ")
        seen.setdefault(words[0], []).append(words[1:])
    refused = sorted(set(seen) - _ALLOWED_STATUS)
    if refused:
        raise TicketRejected(TicketReason.SIGNATURE, f"gpgv reported {', '.join(k[:24] for k in refused[:4])}"
            + (" (the signing key is not the authority's)" if "NO_PUBKEY" in seen else ""))
    for keyword in _EXACTLY_ONCE:
        count = len(seen.get(keyword, ()))
        if count != 1:
            what = "literal data packets" if keyword == "PLAINTEXT" else f"{keyword} lines"
            raise TicketRejected(TicketReason.SIGNATURE, f"gpgv saw {count} {what}; a ticket has exactly one "
                "signature over one literal data packet")
    if returncode != 0:
        raise TicketRejected(TicketReason.SIGNATURE, f"gpgv exited with status {returncode}")
    validsig = seen["VALIDSIG"][0]
    fingerprint = validsig[-1] if len(validsig) >= 10 else ""
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise TicketRejected(TicketReason.SIGNATURE, "gpgv's VALIDSIG line names no primary key fingerprint")
    return fingerprint


def _program(name: str) -> str:
    path = shutil.which(name, path=COMMAND_ENV["PATH"])
    if path is None:
        raise ConfigError(f"authority.ticket_keyring is set but {name} is not installed (Debian: "
                          f"{'gpgv' if name == 'gpgv' else 'util-linux'})")
    return path


class GpgvVerifier:
    """Verify OpenPGP signed messages against one keyring with ``gpgv`` (module docstring, step
    2). Thread-safe: every call works in its own temporary directory."""

    def __init__(self, keyring: bytes, *, host: Host | None = None, timeout: float = GPGV_TIMEOUT,
                 max_output: int = MAX_CONTENT_BYTES) -> None:
        self.keyring = keyring
        self.host = host or Host()
        self.timeout = timeout
        self.max_output = max_output
        self.gpgv = _program("gpgv")
        self.prlimit = _program("prlimit")

    def verify(self, packets: bytes) -> tuple[str, bytes]:
        """``(signer fingerprint, signed content)`` of the binary signed message ``packets``;
        ``TicketRejected`` unless exactly one good signature by a key of the keyring covers it."""
        work = Path(tempfile.mkdtemp(prefix="nm-gpgv-"))
        try:
            keyring, ticket = work / "keyring.gpg", work / "ticket.gpg"
            output, status = work / "content", work / "status"
            keyring.write_bytes(self.keyring)
            ticket.write_bytes(packets)
            argv = [
                self.prlimit, f"--fsize={max(self.max_output, MAX_STATUS_BYTES) + 1}", "--core=0",
                f"--cpu={int(self.timeout) + 1}", "--",
                self.gpgv, "--homedir", str(work), "--keyring", str(keyring), "--status-fd", "1",
                "--log-file", str(work / "log"), "--output", str(output), "--", str(ticket),
            ]
            try:
                result = self.host.run(argv, timeout=self.timeout, check=False, stdout=status)
            except NodeManagerError as exc:  # BackendError: timed out, cannot run
                raise TicketRejected(TicketReason.SIGNATURE, f"gpgv failed: {exc}") from None
            status_bytes = status.read_bytes()[: MAX_STATUS_BYTES + 1] if status.exists() else b""
            if result.returncode < 0 or len(status_bytes) > MAX_STATUS_BYTES:
                raise TicketRejected(TicketReason.TOO_LARGE, f"gpgv stopped (signal {-result.returncode}): the "
                    f"signed content or its status output exceeds {self.max_output} bytes")
            signer = judge_status(status_bytes, result.returncode)
            if not output.is_file() or output.is_symlink():
                raise TicketRejected(TicketReason.SIGNATURE, "gpgv wrote no signed content")
            if output.stat().st_size > self.max_output:
                raise TicketRejected(TicketReason.TOO_LARGE, f"the signed content exceeds {self.max_output} bytes")
            return signer, output.read_bytes()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def plc_ticket(content: bytes, signer: str = "") -> PlcTicket:
    """The :class:`PlcTicket` of a verified ticket's signed ``content`` (step 3 of the module
    docstring); ``TicketRejected(MALFORMED)`` for anything a PLCAPI ticket is not."""
    try:
        value = loads_xmlrpc_response(content, MAX_CONTENT_BYTES)
    except AuthorityError as exc:  # DocumentRejected, or a signed Fault
        raise _rejected(f"the signed content: {str(exc)[:200]}") from None
    if not isinstance(value, Mapping):
        raise _rejected(f"the signed content must be a struct, not {type(value).__name__}")
    timestamp = value.get("timestamp")
    if type(timestamp) is not int or timestamp < 0:
        raise _rejected("the signed content has no non-negative integer timestamp")
    entries = value.get("slivers")
    if type(entries) is not list:
        raise _rejected("the signed content has no slivers array")
    initscripts = _initscript_table(value.get("initscripts"))
    slivers: list[Sliver] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise _rejected(f"sliver #{index} is not a struct")
        checked = _check_sliver(entry, timestamp, initscripts)
        if isinstance(checked, str):
            name = entry.get("name")
            label = f" {name!r}" if isinstance(name, str) and len(name) <= 64 and name.isprintable() else ""
            raise _rejected(f"sliver #{index}{label}: {checked}")
        slivers.append(checked)
    return PlcTicket(timestamp=timestamp, slivers=tuple(slivers), signer=signer)
