"""The connector <-> PoP tunnel protocol's data, without I/O: tokens, route announcements
and the PoP's verdict.

Theory of operation. A connector dials out to a PoP (TLS, PoP certificate checked) and
serves HTTP/2 on that connection (`egressd.mux.reverse`). The PoP opens a first stream,
``egressd-tunnel-hello``; the connector answers it with its token and the routes it
announces (``egressd-routes``: CIDRs and hostname patterns, comma-separated); the PoP
writes one JSON line back on that stream, the verdict (accepted or not, routes accepted,
each refused route with its reason), and keeps the stream open while the connector is
attached. Every later stream is one flow (``egressd-tcp``) whose fields name the
destination; the connector opens it from its own host.

A token is ``egdt.<connector id>.<secret>``: the id lets a PoP find the connector, the
SHA-256 of the whole token is what the configuration keeps. This module does not know
which routes a connector may announce (the PoP checks them against the configuration).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HELLO",
    "ROUTES_HEADER",
    "TOKEN_HEADER",
    "Announcement",
    "Verdict",
    "connector_of",
    "new_token",
    "parse_routes",
    "token_digest",
]

HELLO: Final = "egressd-tunnel-hello"
FLOW: Final = "egressd-tcp"
TOKEN_HEADER: Final = "egressd-token"  # noqa: S105 - a header name
ROUTES_HEADER: Final = "egressd-routes"
TOKEN_PREFIX: Final = "egdt"  # noqa: S105 - the token format
CONNECTOR_ID: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HOST_PATTERN: Final = re.compile(
    r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
MAX_ROUTES: Final = 256
MAX_VERDICT: Final = 64 * 1024


def new_token(connector_id: str) -> str:
    """A fresh token for ``connector_id`` (shown once; keep only ``token_digest``)."""
    if not CONNECTOR_ID.match(connector_id):
        raise ValueError(f"invalid connector id {connector_id!r}")
    return f"{TOKEN_PREFIX}.{connector_id}.{secrets.token_hex(24)}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def connector_of(token: str) -> str | None:
    """The connector id a token claims, or None for something that is not a token."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not CONNECTOR_ID.match(parts[1]):
        return None
    return parts[1]


@dataclass(frozen=True, slots=True)
class Announcement:
    """Routes as a connector announces them: networks and hostname patterns."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hostnames: tuple[str, ...] = ()

    def header(self) -> str:
        return ",".join([str(network) for network in self.networks] + list(self.hostnames))

    @property
    def empty(self) -> bool:
        return not self.networks and not self.hostnames


def parse_routes(text: str) -> Announcement:
    """``10.1.0.0/16,db.corp.example,*.corp.example``; ValueError names the bad item."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    hostnames: list[str] = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if len(items) > MAX_ROUTES:
        raise ValueError(f"{len(items)} routes announced; at most {MAX_ROUTES}")
    for item in items:
        if item[0].isdigit() or ":" in item:
            try:
                networks.append(ipaddress.ip_network(item))
            except ValueError as error:
                raise ValueError(f"route {item[:80]!r}: {error}") from None
        else:
            name = item.lower().rstrip(".")
            if len(name) > 253 or not _HOST_PATTERN.match(name):
                raise ValueError(f"route {item[:80]!r} is neither a CIDR nor a hostname pattern")
            hostnames.append(name)
    return Announcement(tuple(networks), tuple(hostnames))


def host_matches(pattern: str, hostname: str) -> bool:
    """``*.corp.example`` covers ``a.corp.example`` (not ``corp.example``); else equality."""
    hostname = hostname.lower().rstrip(".")
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:])
    return hostname == pattern


@dataclass(frozen=True, slots=True)
class Verdict:
    """The PoP's answer to a connector's hello."""

    accepted: bool
    pop: str = ""
    connector: str = ""
    account: str = ""
    routes: tuple[str, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()  # (route, reason)
    error: str = ""

    def encode(self) -> bytes:
        body = {"accepted": self.accepted, "pop": self.pop, "connector": self.connector,
                "account": self.account, "routes": list(self.routes),
                "refused": [{"route": route, "reason": reason} for route, reason in self.refused],
                "error": self.error}
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Verdict:
        """ValueError for anything that is not a verdict."""
        try:
            body = json.loads(line)
            if not isinstance(body, dict) or not isinstance(body.get("accepted"), bool):
                raise ValueError("not a verdict object")
            refused = tuple((str(item["route"]), str(item["reason"]))
                            for item in body.get("refused", []))
            return cls(accepted=body["accepted"], pop=str(body.get("pop", "")),
                       connector=str(body.get("connector", "")),
                       account=str(body.get("account", "")),
                       routes=tuple(str(route) for route in body.get("routes", [])),
                       refused=refused, error=str(body.get("error", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"malformed verdict: {error}") from None
