"""The private PKI: certificate contents, real TLS handshakes, files created once."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from egressd.pki import (
    CaFiles,
    PkiError,
    ensure_ca,
    ensure_server_cert,
    issue_certificate,
    make_ca,
)

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return make_ca("egressd test CA")


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> E:
    return cert.extensions.get_extension_for_class(kind).value


def critical(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    return cert.extensions.get_extension_for_class(kind).critical


def test_ca_certificate(ca: tuple[bytes, bytes]) -> None:
    key_pem, cert_pem = ca
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert b"PRIVATE KEY" in key_pem
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    basic = ext(cert, x509.BasicConstraints)
    assert critical(cert, x509.BasicConstraints) and basic.ca and basic.path_length == 0
    usage = ext(cert, x509.KeyUsage)
    assert critical(cert, x509.KeyUsage) and usage.key_cert_sign and usage.crl_sign
    ski = ext(cert, x509.SubjectKeyIdentifier)
    aki = ext(cert, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ski.digest
    cert.verify_directly_issued_by(cert)


def test_server_certificate_extensions(ca: tuple[bytes, bytes]) -> None:
    _, cert_pem = issue_certificate(
        *ca, "echo", dns_names=["localhost", "Echo.Example."], ip_addresses=["127.0.0.1", "::1"]
    )
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca[1])
    cert.verify_directly_issued_by(ca_cert)
    assert cert.issuer == ca_cert.subject
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert not ext(cert, x509.BasicConstraints).ca
    usage = ext(cert, x509.KeyUsage)
    assert critical(cert, x509.KeyUsage) and usage.digital_signature
    assert not usage.key_cert_sign
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "echo.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    ca_ski = ext(ca_cert, x509.SubjectKeyIdentifier).digest
    assert ext(cert, x509.AuthorityKeyIdentifier).key_identifier == ca_ski
    assert ext(cert, x509.SubjectKeyIdentifier).digest != ca_ski


def test_client_and_server_usages(ca: tuple[bytes, bytes]) -> None:
    _, both = issue_certificate(*ca, "lax.pop", ["lax.pop"], client=True, server=True)
    usages = list(ext(x509.load_pem_x509_certificate(both), x509.ExtendedKeyUsage))
    assert usages == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    _, client_only = issue_certificate(*ca, "device 42", client=True, server=False)
    cert = x509.load_pem_x509_certificate(client_only)
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):  # no names: no (empty, invalid) SAN
        ext(cert, x509.SubjectAlternativeName)
    with pytest.raises(ValueError, match="client or server"):
        issue_certificate(*ca, "nothing", client=False, server=False)


def test_server_without_names_uses_the_common_name(ca: tuple[bytes, bytes]) -> None:
    for common_name, kind in (("echo.local", x509.DNSName), ("192.0.2.9", x509.IPAddress)):
        _, cert_pem = issue_certificate(*ca, common_name)
        san = ext(x509.load_pem_x509_certificate(cert_pem), x509.SubjectAlternativeName)
        assert [str(value) for value in san.get_values_for_type(kind)] == [common_name]
    with pytest.raises(ValueError, match="not a valid DNS name"):
        issue_certificate(*ca, "has spaces")


def test_validity_is_back_dated_and_bounded_by_the_ca() -> None:
    ca = make_ca("short CA", days=30, now=NOW)
    _, cert_pem = issue_certificate(*ca, "echo", ["echo"], days=365, now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca[1])
    assert cert.not_valid_before_utc < NOW
    assert (
        cert.not_valid_after_utc == ca_cert.not_valid_after_utc == NOW + datetime.timedelta(days=30)
    )
    with pytest.raises(ValueError, match="timezone"):
        issue_certificate(*ca, "echo", now=datetime.datetime(2030, 1, 1))


def test_mismatched_ca_key_is_refused(ca: tuple[bytes, bytes]) -> None:
    other_key, _ = make_ca("other")
    with pytest.raises(PkiError, match="does not match"):
        issue_certificate(other_key, ca[1], "echo")


# --- real TLS handshakes ------------------------------------------------------------------


async def handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str, host: str
) -> bytes:
    """Run one TLS exchange on loopback; the server echoes its peer certificate's CN."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = writer.get_extra_info("peercert") or {}
            subject = dict(item[0] for item in peer.get("subject", ()))
            writer.write(str(subject.get("commonName", "-")).encode())
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, host, 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_context, server_hostname=server_hostname
        )
        data = await reader.read()
        writer.close()
        return data
    finally:
        server.close()
        await server.wait_closed()


def write_pair(tmp_path: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    key_path, cert_path = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    key_path.write_bytes(pair[0])
    cert_path.write_bytes(pair[1])
    return cert_path, key_path


@pytest.mark.parametrize(
    ("host", "server_hostname"),
    [("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1")],
)
async def test_tls_handshake_verifies_against_the_ca(
    tmp_path: Path, ca: tuple[bytes, bytes], host: str, server_hostname: str
) -> None:
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca[1])
    server_pair = issue_certificate(*ca, "echo", ["localhost"], ["127.0.0.1", "::1"])
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(*write_pair(tmp_path, "server", server_pair))
    client_context = ssl.create_default_context(cafile=str(ca_path))
    assert await handshake(server_context, client_context, server_hostname, host) == b"-"


async def test_mutual_tls_with_a_client_certificate(
    tmp_path: Path, ca: tuple[bytes, bytes]
) -> None:
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca[1])
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_path))
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_cert_chain(
        *write_pair(tmp_path, "server", issue_certificate(*ca, "localhost"))
    )
    client_context = ssl.create_default_context(cafile=str(ca_path))
    client_pair = issue_certificate(*ca, "device-42", client=True, server=False)
    client_context.load_cert_chain(*write_pair(tmp_path, "client", client_pair))
    assert await handshake(server_context, client_context, "localhost", "127.0.0.1") == b"device-42"


async def test_tls_rejects_another_ca_and_a_wrong_name(
    tmp_path: Path, ca: tuple[bytes, bytes]
) -> None:
    other_ca = make_ca("stranger CA")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(
        *write_pair(tmp_path, "server", issue_certificate(*other_ca, "localhost"))
    )
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca[1])
    client_context = ssl.create_default_context(cafile=str(ca_path))
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await handshake(server_context, client_context, "localhost", "127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(
        *write_pair(tmp_path, "server", issue_certificate(*ca, "localhost"))
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await handshake(server_context, client_context, "elsewhere.example", "127.0.0.1")


# --- files ------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ensure_ca_creates_once_with_private_keys(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    files = ensure_ca(directory)
    assert files == CaFiles(directory / "ca.crt", directory / "ca.key")
    assert mode(files.key_path) == 0o600
    assert mode(files.cert_path) == 0o644
    assert mode(directory) == 0o700
    first = files.read()
    assert ensure_ca(directory) == files
    assert files.read() == first
    assert not list(directory.glob(".*.tmp"))


def test_ensure_ca_refuses_to_guess(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path)
    files.cert_path.unlink()
    with pytest.raises(PkiError, match=r"incomplete: .*ca.crt is missing"):
        ensure_ca(tmp_path)
    other = tmp_path / "other"
    other_files = ensure_ca(other)
    files.cert_path.write_bytes(other_files.cert_path.read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        ensure_ca(tmp_path)
    with pytest.raises(PkiError, match="expired"):
        ensure_ca(other, now=NOW + datetime.timedelta(days=3650 * 3))


def test_ensure_server_cert_is_idempotent(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "ca")
    files = ensure_server_cert(tmp_path / "certs", "echo", ["localhost"], ["127.0.0.1", "::1"], ca)
    assert files.cert_path == tmp_path / "certs" / "echo.crt"
    assert files.ca_cert_path == ca.cert_path
    assert mode(files.key_path) == 0o600
    before = files.cert_path.read_bytes(), files.key_path.read_bytes()
    again = ensure_server_cert(tmp_path / "certs", "echo", ["localhost"], ["::1", "127.0.0.1"], ca)
    assert again == files
    assert (files.cert_path.read_bytes(), files.key_path.read_bytes()) == before
    cert = x509.load_pem_x509_certificate(before[0])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_path.read_bytes()))


def certificate_bytes(directory: Path, name: str = "echo") -> bytes:
    return (directory / f"{name}.crt").read_bytes()


def test_ensure_server_cert_reissues_when_it_must(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    ensure_server_cert(tmp_path, "echo", ["localhost"], [], ca)
    original = certificate_bytes(tmp_path)
    # other names
    ensure_server_cert(tmp_path, "echo", ["localhost", "echo.lab"], [], ca)
    renamed = certificate_bytes(tmp_path)
    assert renamed != original
    # also for client authentication
    ensure_server_cert(tmp_path, "echo", ["localhost", "echo.lab"], [], ca, client=True)
    assert certificate_bytes(tmp_path) != renamed
    both = certificate_bytes(tmp_path)
    # near expiry (the 30-day renewal window)
    cert = x509.load_pem_x509_certificate(both)
    late = cert.not_valid_after_utc - datetime.timedelta(days=10)
    ensure_server_cert(tmp_path, "echo", ["localhost", "echo.lab"], [], ca, client=True, now=late)
    assert certificate_bytes(tmp_path) != both
    # another CA
    renewed = certificate_bytes(tmp_path)
    other_ca = ensure_ca(tmp_path / "other")
    ensure_server_cert(tmp_path, "echo", ["localhost", "echo.lab"], [], other_ca, client=True)
    assert certificate_bytes(tmp_path) != renewed
    issued = x509.load_pem_x509_certificate(certificate_bytes(tmp_path))
    issued.verify_directly_issued_by(
        x509.load_pem_x509_certificate(other_ca.cert_path.read_bytes())
    )
    # a damaged key
    (tmp_path / "echo.key").write_bytes(b"garbage")
    ensure_server_cert(tmp_path, "echo", ["localhost", "echo.lab"], [], other_ca, client=True)
    assert b"PRIVATE KEY" in (tmp_path / "echo.key").read_bytes()
    assert mode(tmp_path / "echo.key") == 0o600


def test_ensure_server_cert_validates_the_name(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    for name in ("../escape", "", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="plain file name"):
            ensure_server_cert(tmp_path, name, ["localhost"], [], ca)
