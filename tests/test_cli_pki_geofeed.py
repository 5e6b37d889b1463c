"""`egressd pki` (CA, PoP and device certificates usable for real mTLS) and
`egressd geofeed -d FILE` (R10 from a deployment file alone)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

from typer.testing import CliRunner

from egressd.cli import app
from egressd.protocols.geofeed import GeofeedIndex

SEED = Path(__file__).parents[1] / "examples" / "seed.toml"


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_pki_makes_certificates_that_authenticate_both_ends(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    run("pki", "init", "--dir", str(pki))
    run("pki", "pop", "lax", "--dir", str(pki), "--ip", "127.0.0.1")
    run("pki", "device", "acme-laptop", "--dir", str(pki))
    for key in ("ca.key", "pop-lax.key", "device-acme-laptop.key"):
        assert stat.S_IMODE(os.stat(pki / key).st_mode) == 0o600
    assert "usage:    server, client" in run("pki", "show", str(pki / "pop-lax.crt"))
    assert "usage:    client" in run("pki", "show", str(pki / "device-acme-laptop.crt"))
    # A real TLS 1.3 handshake: the PoP certificate serves, the device certificate is
    # verified by the server against the same CA.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki / "pop-lax.crt", pki / "pop-lax.key")
    server.load_verify_locations(pki / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(pki / "device-acme-laptop.crt", pki / "device-acme-laptop.key")
    client.load_verify_locations(pki / "ca.crt")
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            peer = tls.getpeercert()
            seen.append(dict(item[0] for item in peer["subject"])["commonName"])

    thread = threading.Thread(target=accept)
    thread.start()
    with socket.create_connection(listener.getsockname()) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() == "TLSv1.3"
    thread.join(5)
    listener.close()
    assert seen == ["acme-laptop"]


def test_pki_commands_explain_a_missing_ca(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pki", "pop", "lax", "--dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "egressd pki init" in result.output


def test_geofeed_from_a_deployment_file(tmp_path: Path) -> None:
    out = tmp_path / "geofeed.csv"
    run("geofeed", "-d", str(SEED), "-o", str(out))
    index = GeofeedIndex.from_text(out.read_text())
    assert index.lookup("198.51.100.50").city == "Los Angeles"  # acme's lax location
    assert index.lookup("198.51.100.10").city == "Las Vegas"  # a shared address
    entry = index.lookup("2001:db8:100::1234")  # anywhere in the dedicated IPv6 range (R9)
    assert entry is not None and entry.city == "Los Angeles" and entry.region == "US-CA"
