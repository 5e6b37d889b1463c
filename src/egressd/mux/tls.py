"""TLS for mux links: TLS 1.3 only, both sides authenticated by one deployment CA, ALPN h2.

The CA is the trust root of the backbone: a peer is whoever holds a certificate from it
(``egressd.pki`` issues them). ``PeerIdentity`` is what the server learns of the client
from its verified certificate; authorising it (is this PoP allowed to ask for that?) is
the caller's job.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PeerIdentity", "client_context", "peer_identity", "server_context"]

ALPN_PROTOCOLS = ["h2"]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The verified client certificate's subject common name and subject alternative names."""

    common_name: str
    sans: tuple[str, ...] = ()


def peer_identity(certificate: Mapping[str, Any]) -> PeerIdentity:
    """From ``SSLSocket.getpeercert()``'s dict (only filled for a verified certificate)."""
    common_name = ""
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common_name = str(value)
    sans = tuple(str(value) for _kind, value in certificate.get("subjectAltName", ()))
    return PeerIdentity(common_name=common_name, sans=sans)


def _base(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A listener's context: requires a client certificate issued by ``ca``."""
    context = _base(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A dialer's context: presents ``cert``, verifies the server (name included) against ``ca``."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=ca)
    return context
