"""The bundled authority's signing identity: an RSA key and its self-signed X.509 certificate.

Why a certificate and not a bare public key: nodes pin the authority's key with one PEM file
(``authority.ticket_cert``) that both signxml (``x509_cert=``) and xmlsec1
(``--pubkey-cert-pem``) load directly. The certificate is self-signed and only a container for the
key: nodes trust exactly this certificate, never a chain or what a ticket carries.

Both files are generated on first use next to the authority's data file (``<data>.key.pem``, mode
0600, and ``<data>.cert.pem``) unless the data file names other paths (``[authority] key_file``,
``cert_file``; relative paths are next to the data file). The key is generated once and then
reused: publishing is ``link(2)`` of a complete temporary file, so two processes starting at once
end up with the same key, and an existing key is never overwritten. A certificate whose key is
missing, or that does not match the key, is a ``ConfigError``: regenerating silently would make
every node reject every ticket.

Signing is signxml's enveloped XML-DSig (RSA-SHA256, SHA-256 digest, exclusive C14N, one
reference ``URI=""``), interoperable with ``xmlsec1`` both ways. No canonicalization or signature
code of our own.
"""

from __future__ import annotations

import datetime
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import (
    CanonicalizationMethod,
    DigestAlgorithm,
    SignatureConstructionMethod,
    SignatureMethod,
    XMLSigner,
)

from ..core.errors import ConfigError
from .model import TicketSettings, load_authority_text

logger = logging.getLogger(__name__)

KEY_BITS = 3072
CERT_VALIDITY = datetime.timedelta(days=20 * 365)
COMMON_NAME = "nodemanager bundled authority"
KEY_SUFFIX = ".key.pem"
CERT_SUFFIX = ".cert.pem"
#: Settings of a data file that names no key or certificate paths.
DEFAULT_SETTINGS = TicketSettings()


@dataclass(frozen=True)
class SigningIdentity:
    """The authority's private key and the certificate nodes pin."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    key_path: Path
    cert_path: Path

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def identity_paths(data_path: Path, settings: TicketSettings = DEFAULT_SETTINGS) -> tuple[Path, Path]:
    """Where the key and certificate of the authority whose data file is ``data_path`` live."""
    data_path = Path(data_path)

    def resolve(configured: str, suffix: str) -> Path:
        if configured:
            path = Path(configured)
            return path if path.is_absolute() else data_path.parent / path
        return data_path.with_name(data_path.name + suffix)

    return resolve(settings.key_file, KEY_SUFFIX), resolve(settings.cert_file, CERT_SUFFIX)


def publish_file(path: Path, data: bytes, mode: int, *, exclusive: bool) -> bool:
    """Write ``data`` to ``path`` atomically with ``mode`` (a complete temporary file in the same
    directory, then link or rename). ``exclusive``: never replace an existing file (False
    returned when one exists). Raises ``OSError``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
            tmp = ""
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def _new_certificate(key: rsa.RSAPrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=True, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"authority key {path}: cannot read: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"authority key {path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise ConfigError(f"authority key {path}: must be an RSA key of at least 2048 bits")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        logger.warning("event=authority-key-readable-by-others path=%s hint=chmod-600", path)
    return key


def load_or_create_identity(key_path: Path, cert_path: Path) -> SigningIdentity:
    """Load the key and certificate, generating whichever is missing (see the module docstring).
    Raises ``ConfigError`` naming the file and the reason."""
    key_path, cert_path = Path(key_path), Path(cert_path)
    try:
        if not key_path.exists():
            if cert_path.exists():
                raise ConfigError(
                    f"authority certificate {cert_path} exists but its key {key_path} does not: "
                    "restore the key, or remove the certificate to start a new identity (nodes must "
                    "then be given the new certificate)"
                )
            key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if publish_file(key_path, pem, 0o600, exclusive=True):
                logger.info("event=authority-key-generated path=%s bits=%d", key_path, KEY_BITS)
        key = _load_key(key_path)
        if not cert_path.exists():
            certificate = _new_certificate(key, datetime.datetime.now(datetime.UTC))
            if publish_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644, exclusive=True):
                logger.info("event=authority-certificate-generated path=%s", cert_path)
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"authority certificate {cert_path}: not a PEM certificate: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"authority signing files {key_path}, {cert_path}: {exc.strerror or exc}") from exc
    if certificate.public_key() != key.public_key():
        raise ConfigError(f"authority certificate {cert_path} does not belong to the key {key_path}")
    return SigningIdentity(key, certificate, key_path, cert_path)


def identity_for(data_path: Path, settings: TicketSettings = DEFAULT_SETTINGS) -> SigningIdentity:
    """The signing identity of the authority whose data file is ``data_path``."""
    return load_or_create_identity(*identity_paths(data_path, settings))


def sign_document(element: Any, identity: SigningIdentity) -> bytes:
    """Sign the XML ``element`` (enveloped; see the module docstring) and return the document
    bytes with an XML declaration. The signature carries the certificate (X509Data) as a
    courtesy; nodes ignore it and verify only against their configured certificate."""
    signer = XMLSigner(
        method=SignatureConstructionMethod.enveloped,
        signature_algorithm=SignatureMethod.RSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
    )
    signed = signer.sign(element, key=identity.key, cert=[identity.certificate])
    return etree.tostring(signed, xml_declaration=True, encoding="UTF-8")


def export_certificate(data_path: Path, out_path: Path) -> Path:
    """Write the certificate of the authority whose data file is ``data_path`` to ``out_path``
    (mode 0644; generating key and certificate on first use) for nodes' ``authority.ticket_cert``.
    Honours the data file's ``key_file``/``cert_file``. Returns ``out_path``."""
    data_path = Path(data_path)
    try:
        text = data_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read authority data {data_path}: {exc}") from exc
    data = load_authority_text(text, timestamp=0, base_time=0, origin=str(data_path))
    identity = identity_for(data_path, data.tickets)
    out_path = Path(out_path)
    try:
        publish_file(out_path, identity.certificate_pem(), 0o644, exclusive=False)
    except OSError as exc:
        raise ConfigError(f"cannot write the certificate to {out_path}: {exc.strerror or exc}") from exc
    logger.info("event=authority-certificate-exported path=%s", out_path)
    return out_path
