"""A small private PKI: one CA, and the server and client certificates it issues.

The PoP's HTTPS proxy listener, the backbone's mutual TLS and the echo origin's HTTP/3
endpoint need certificates that devices and peers can verify against one CA that the
organisation controls. ``make_ca``/``issue_certificate`` are pure (PEM bytes in, PEM
bytes out; time is a parameter); ``ensure_ca``/``ensure_server_cert`` are the thin
file-system shell: they create the files on the first run and reuse them afterwards,
reissuing a certificate only when it is near expiry, names other hosts, or was issued by
another CA.

Keys are EC P-256. Private keys are written unencrypted with mode 0600 (the process
must read them unattended); protecting the directory is the operator's job.

What it does not know: revocation (CRLs, OCSP), ACME, hardware keys.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_DAYS",
    "CERT_DAYS",
    "CaFiles",
    "CertFiles",
    "PkiError",
    "ensure_ca",
    "ensure_server_cert",
    "issue_certificate",
    "make_ca",
]

CA_DAYS: Final = 3650
#: Leaf lifetime: the longest that browsers and most TLS clients accept.
CERT_DAYS: Final = 397
#: ``ensure_server_cert`` reissues a certificate this close to its expiry.
RENEW_BEFORE: Final = datetime.timedelta(days=30)
#: Back-date ``notBefore`` so that a peer whose clock is a little behind accepts it.
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)
_HOSTNAME: Final = re.compile(
    r"(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)
_FILE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PkiError(Exception):
    """Certificate files are unusable (half present, mismatched, expired CA)."""


@dataclass(frozen=True, slots=True)
class CaFiles:
    """Where a CA's certificate and private key live."""

    cert_path: Path
    key_path: Path

    def read(self) -> tuple[bytes, bytes]:
        """(key_pem, cert_pem), the order ``issue_certificate`` takes them in."""
        return self.key_path.read_bytes(), self.cert_path.read_bytes()


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Where an issued certificate, its key and the issuing CA's certificate live."""

    cert_path: Path
    key_path: Path
    ca_cert_path: Path


# --- pure: PEM in, PEM out ------------------------------------------------------------


def _now(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_issuer_key(key_pem: bytes) -> CertificateIssuerPrivateKeyTypes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise PkiError(f"a {type(key).__name__} cannot sign certificates")
    return key


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign the message itself; the API wants no hash for them.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > 64:
        raise ValueError("common_name must be 1 to 64 characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(
    common_name: str, *, days: int = CA_DAYS, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A self-signed CA that may issue leaf certificates only: (key_pem, cert_pem)."""
    start = _now(now)
    key = _new_key()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _subject_alt_names(
    common_name: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str | IPAddress],
    server: bool,
) -> list[x509.GeneralName]:
    """The SAN entries; a server without any falls back to its common name."""
    if server and not dns_names and not ip_addresses:
        try:
            return [x509.IPAddress(ipaddress.ip_address(common_name))]
        except ValueError:
            dns_names = [common_name]
    names: list[x509.GeneralName] = []
    for dns_name in dns_names:
        if not _HOSTNAME.fullmatch(dns_name) or len(dns_name) > 253:
            raise ValueError(f"{dns_name!r} is not a valid DNS name (use A-labels for IDNs)")
        names.append(x509.DNSName(dns_name.rstrip(".").lower()))
    for address in ip_addresses:
        names.append(x509.IPAddress(ipaddress.ip_address(address)))
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def issue_certificate(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    common_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str | IPAddress] = (),
    client: bool = False,
    server: bool = True,
    days: int = CERT_DAYS,
    *,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA: (key_pem, cert_pem).

    ``server``/``client`` choose the extended key usages (at least one). A server
    certificate needs a subject alternative name (clients ignore the common name):
    without ``dns_names``/``ip_addresses`` the common name is used when it is a
    host name or an address. The validity never outlasts the CA's.
    """
    if not (client or server):
        raise ValueError("a certificate must allow client or server authentication")
    start = _now(now)
    ca_key = _load_issuer_key(ca_key_pem)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    if ca_cert.public_key() != ca_key.public_key():
        raise PkiError("the CA key does not match the CA certificate")
    alt_names = _subject_alt_names(common_name, dns_names, ip_addresses, server)
    key = _new_key()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    not_after = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, _hash_for(ca_key))
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


# --- shell: files on disk -------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise ensure_* across processes, so two never write a mixed key/cert pair."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)  # the umask may have narrowed or the file pre-existed
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def _write_pair(cert_path: Path, key_path: Path, key_pem: bytes, cert_pem: bytes) -> None:
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert_pem, 0o644)


def ensure_ca(
    directory: Path, common_name: str = "egressd CA", *, now: datetime.datetime | None = None
) -> CaFiles:
    """``ca.crt``/``ca.key`` in ``directory``: created once, then reused as they are.

    A CA is never replaced silently (every issued certificate depends on it): a half
    present, mismatched or expired pair raises :class:`PkiError` for a human to sort out.
    """
    files = CaFiles(cert_path=directory / "ca.crt", key_path=directory / "ca.key")
    with _locked(directory):
        present = files.cert_path.exists(), files.key_path.exists()
        if present == (False, False):
            key_pem, cert_pem = make_ca(common_name, now=now)
            _write_pair(files.cert_path, files.key_path, key_pem, cert_pem)
            return files
        if present != (True, True):
            missing = files.cert_path if not present[0] else files.key_path
            raise PkiError(f"CA in {directory} is incomplete: {missing} is missing")
        key_pem, cert_pem = files.read()
        try:
            key = _load_issuer_key(key_pem)
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as error:
            raise PkiError(f"CA in {directory} is unreadable: {error}") from None
        if cert.public_key() != key.public_key():
            raise PkiError(f"{files.key_path} does not match {files.cert_path}")
        if cert.not_valid_after_utc <= _now(now):
            raise PkiError(f"CA certificate {files.cert_path} expired {cert.not_valid_after_utc}")
    return files


def _reusable(
    files: CertFiles,
    ca_cert: x509.Certificate,
    wanted_names: set[x509.GeneralName],
    wanted_usages: set[x509.ObjectIdentifier],
    now: datetime.datetime,
) -> bool:
    """Whether the existing pair was issued by this CA for these hosts/uses, and is fresh."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert_path.read_bytes())
        key = serialization.load_pem_private_key(files.key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    return (
        cert.public_key() == key.public_key()
        and names == wanted_names
        and usages == wanted_usages
        and cert.not_valid_after_utc - RENEW_BEFORE > now
    )


def ensure_server_cert(
    directory: Path,
    name: str,
    dns_names: Sequence[str],
    ips: Sequence[str | IPAddress],
    ca: CaFiles,
    *,
    client: bool = False,
    days: int = CERT_DAYS,
    now: datetime.datetime | None = None,
) -> CertFiles:
    """``<name>.crt``/``<name>.key`` in ``directory``, issued by ``ca`` for these hosts.

    Reused while valid for more than 30 days, issued by ``ca`` and naming exactly
    ``dns_names`` and ``ips``; otherwise (re)issued. ``client`` also allows client
    authentication (a PoP's backbone certificate is both).
    """
    if not _FILE_NAME.fullmatch(name):
        raise ValueError(f"certificate name {name!r} must be a plain file name")
    files = CertFiles(
        cert_path=directory / f"{name}.crt",
        key_path=directory / f"{name}.key",
        ca_cert_path=ca.cert_path,
    )
    start = _now(now)
    ca_key_pem, ca_cert_pem = ca.read()
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    wanted_names = set(_subject_alt_names(name, dns_names, ips, server=True))
    wanted_usages = {ExtendedKeyUsageOID.SERVER_AUTH}
    wanted_usages |= {ExtendedKeyUsageOID.CLIENT_AUTH} if client else set()
    with _locked(directory):
        if _reusable(files, ca_cert, wanted_names, wanted_usages, start):
            return files
        key_pem, cert_pem = issue_certificate(
            ca_key_pem,
            ca_cert_pem,
            name,
            dns_names,
            ips,
            client=client,
            server=True,
            days=days,
            now=start,
        )
        _write_pair(files.cert_path, files.key_path, key_pem, cert_pem)
    return files
