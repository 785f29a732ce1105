"""The bundled authority's OpenPGP identity, for PLCAPI-shaped OpenPGP tickets (tickets.md).

A real PLCAPI signs tickets with ``gpg --batch --no-tty --armor --sign`` and its GnuPG key; so does
the bundled authority, with GnuPG 2's ``gpg`` and a key of its own kept next to its RSA key (see
:mod:`.signing`): the GnuPG home ``<data>.gnupg/`` (mode 0700) in the directory of the RSA key, and
the public key nodes need (``authority.ticket_keyring``), exported as a binary keyring
``<data>.pgp-pub.gpg`` (0644) next to it. Like the RSA key, the GnuPG key (RSA-3072, sign only,
no passphrase: the directory's mode protects it) is generated on first use, in a temporary home
that is then renamed into place, so two processes starting at once end up with the same key and
an existing key is never replaced.

``gpg`` starts a ``gpg-agent`` for each home; it is stopped (``gpgconf --kill``) after every use so
that no daemon outlives the command (gpg reaches the home through a short symbolic link: the
agent's socket path must fit in 107 bytes). Every command goes through :meth:`nodemanager.host.Host.run`
(argument lists, no shell); failures are ``ConfigError`` (the operator's problem, as for the RSA
key).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BackendError, ConfigError
from ..host import COMMAND_ENV, Host
from .model import TicketSettings
from .signing import DEFAULT_SETTINGS, identity_paths, publish_file

logger = logging.getLogger(__name__)

HOME_SUFFIX = ".gnupg"
PUBLIC_SUFFIX = ".pgp-pub.gpg"
KEY_PARAMETERS = b"""Key-Type: RSA
Key-Length: 3072
Key-Usage: sign
Name-Real: nodemanager bundled authority
Expire-Date: 0
%no-protection
%commit
"""
GPG_TIMEOUT = 120.0


@dataclass(frozen=True)
class PgpIdentity:
    """Where the authority's GnuPG key lives, and its fingerprint."""

    home: Path
    public_path: Path
    fingerprint: str


def pgp_paths(data_path: Path, settings: TicketSettings = DEFAULT_SETTINGS) -> tuple[Path, Path]:
    """The GnuPG home and the exported public keyring of the authority whose data file is
    ``data_path``: in the directory of its RSA key (``[authority] key_file``, default next to
    the data file)."""
    key_path, _ = identity_paths(data_path, settings)
    name = Path(data_path).name
    return key_path.parent / (name + HOME_SUFFIX), key_path.parent / (name + PUBLIC_SUFFIX)


def _program(name: str) -> str:
    path = shutil.which(name, path=COMMAND_ENV["PATH"])
    if path is None:
        raise ConfigError(f"OpenPGP tickets need {name} (Debian: gnupg)")
    return path


class GpgSigner:
    """The authority's ``gpg``: key generation, export and signing in one GnuPG home."""

    def __init__(self, home: Path, public_path: Path, *, host: Host | None = None) -> None:
        self.home = Path(home)
        self.public_path = Path(public_path)
        self.host = host or Host()
        self.gpg = _program("gpg")
        self.gpgconf = _program("gpgconf")

    def _run(self, home: Path, *args: str, input: bytes | None = None) -> bytes:
        # gpg-agent's sockets live in the home, and a Unix socket path has at most 107 bytes: gpg
        # is given a short symbolic link to the home (in a private temporary directory) instead.
        short = Path(tempfile.mkdtemp(prefix="nm-gpg-"))
        link = short / "h"
        try:
            link.symlink_to(Path(home).resolve())
            try:
                return self.host.run([self.gpg, "--homedir", str(link), "--batch", "--no-tty", *args],
                                     input=input, timeout=GPG_TIMEOUT).stdout
            finally:
                self.host.run([self.gpgconf, "--homedir", str(link), "--kill", "gpg-agent"], timeout=30, check=False)
        except BackendError as exc:
            raise ConfigError(f"authority GnuPG home {self.home}: {exc}") from exc
        finally:
            shutil.rmtree(short, ignore_errors=True)

    def fingerprint(self, home: Path | None = None) -> str | None:
        """The fingerprint of the (first) secret key in the home, None when it holds none."""
        listing = self._run(home or self.home, "--with-colons", "--list-secret-keys").decode("utf-8", "replace")
        in_secret = False
        for line in listing.splitlines():
            fields = line.split(":")
            if fields[0] == "sec":
                in_secret = True
            elif fields[0] == "fpr" and in_secret and len(fields) > 9:
                return fields[9]
        return None

    def load_or_create(self) -> PgpIdentity:
        """The identity, generating the key on first use and (re)exporting the public keyring."""
        try:
            if not self.home.exists():
                self._generate()
            fingerprint = self.fingerprint()
            if fingerprint is None:
                raise ConfigError(f"authority GnuPG home {self.home} holds no secret key: restore it, or remove "
                                  "the directory to start a new key (nodes must then get the new public key)")
            public = self._run(self.home, "--export", fingerprint)
            if not self.public_path.exists() or self.public_path.read_bytes() != public:
                publish_file(self.public_path, public, 0o644, exclusive=False)
                logger.info("event=authority-pgp-key-exported path=%s fingerprint=%s", self.public_path, fingerprint)
        except OSError as exc:
            raise ConfigError(f"authority GnuPG files {self.home}, {self.public_path}: {exc.strerror or exc}") from exc
        return PgpIdentity(self.home, self.public_path, fingerprint)

    def _generate(self) -> None:
        staging = Path(tempfile.mkdtemp(prefix=f".{self.home.name}.", dir=self.home.parent))
        try:
            self._run(staging, "--gen-key", input=KEY_PARAMETERS)
            try:
                os.rename(staging, self.home)
            except OSError:  # another process published its key first: use that one
                if not self.home.is_dir():
                    raise
            else:
                logger.info("event=authority-pgp-key-generated home=%s", self.home)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def sign(self, identity: PgpIdentity, content: bytes) -> bytes:
        """``gpg --batch --no-tty --armor --sign`` of ``content`` with the authority's key: the
        ASCII-armored signed message, as PLCAPI makes it."""
        return self._run(identity.home, "--local-user", identity.fingerprint, "--armor", "--sign",
                         "--output", "-", input=content)


def pgp_signer_for(data_path: Path, settings: TicketSettings = DEFAULT_SETTINGS) -> GpgSigner:
    """The ``gpg`` signer of the authority whose data file is ``data_path``."""
    return GpgSigner(*pgp_paths(data_path, settings))
