"""Certificates for the mux tests, made by egressd.pki: a deployment CA with a PoP
certificate (server and client) and a device certificate, and a second, foreign CA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from egressd.pki import issue_certificate, make_ca

SERVER_NAME = "lax.pop.egressd.test"


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    pop: Pem  # server + client authentication, like a PoP's backbone certificate
    device: Pem  # client authentication only
    foreign_ca: Path
    foreign_pop: Pem  # issued by foreign_ca for the same names


def _write(directory: Path, name: str, key_pem: bytes, cert_pem: bytes) -> Pem:
    (directory / f"{name}.key").write_bytes(key_pem)
    (directory / f"{name}.crt").write_bytes(cert_pem)
    return Pem(cert=directory / f"{name}.crt", key=directory / f"{name}.key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("mux-pki")
    ca_key, ca_cert = make_ca("egressd test CA")
    (directory / "ca.crt").write_bytes(ca_cert)
    pop = issue_certificate(
        ca_key, ca_cert, "lax", [SERVER_NAME], ["127.0.0.1"], client=True, server=True
    )
    device = issue_certificate(ca_key, ca_cert, "device-1", client=True, server=False)
    foreign_key, foreign_cert = make_ca("somebody else's CA")
    (directory / "foreign-ca.crt").write_bytes(foreign_cert)
    foreign = issue_certificate(
        foreign_key, foreign_cert, "lax", [SERVER_NAME], ["127.0.0.1"], client=True, server=True
    )
    return Pki(
        ca=directory / "ca.crt",
        pop=_write(directory, "pop", *pop),
        device=_write(directory, "device", *device),
        foreign_ca=directory / "foreign-ca.crt",
        foreign_pop=_write(directory, "foreign-pop", *foreign),
    )
