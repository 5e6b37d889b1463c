"""Targets and credentials of the device link's extended CONNECT requests, sans-I/O.

A device opens each flow to its PoP as one HTTP/2 extended CONNECT (RFC 8441) whose
``:path`` names the target with the MASQUE well-known templates: RFC 9298 for UDP
(``connect-udp``, ``/.well-known/masque/udp/{host}/{port}/``) and the same shape for TCP
(``connect-tcp``, as in the IETF draft "Template-Driven HTTP CONNECT Proxying for TCP").
The device credential rides in ``proxy-authorization`` (Basic), as on the HTTP proxy.

What it does not know: HTTP/2, sockets, who the device is (the PoP checks the pair).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Final
from urllib.parse import quote, unquote

__all__ = ["PROTOCOL_TCP", "PROTOCOL_UDP", "basic_authorization", "parse_basic",
           "parse_target", "target_path"]

PROTOCOL_TCP: Final = "connect-tcp"
PROTOCOL_UDP: Final = "connect-udp"
_KINDS: Final = {PROTOCOL_TCP: "tcp", PROTOCOL_UDP: "udp"}
_PATH: Final = re.compile(r"/\.well-known/masque/(tcp|udp)/([^/]{1,1024})/([0-9]{1,5})/")
_NAME: Final = re.compile(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?")


def target_path(protocol: str, host: str, port: int) -> str:
    """The ``:path`` for a flow to ``host``:``port`` (IPv6 colons percent-encoded)."""
    if protocol not in _KINDS:
        raise ValueError(f"unknown protocol {protocol!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return f"/.well-known/masque/{_KINDS[protocol]}/{quote(host.strip('[]'), safe='')}/{port}/"


def parse_target(protocol: str, path: str) -> tuple[str, int]:
    """(host, port) from a request's ``:path``; ValueError says what is wrong."""
    match = _PATH.fullmatch(path)
    if match is None or _KINDS.get(protocol) != match.group(1):
        raise ValueError(f"path {path[:80]!r} is not a {protocol} target "
                         f"(/.well-known/masque/{_KINDS.get(protocol, '?')}/HOST/PORT/)")
    host = unquote(match.group(2)).lower()
    port = int(match.group(3))
    if not 1 <= port <= 65535 or match.group(3).startswith("0"):
        raise ValueError(f"port {match.group(3)} out of range")
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        pass
    if _NAME.fullmatch(host) is None:
        raise ValueError(f"target host {host[:80]!r} is neither an address nor a host name")
    return host.rstrip("."), port


def basic_authorization(user: str, password: str) -> str:
    """The ``proxy-authorization`` value for a device id and its secret."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def parse_basic(value: str | None) -> tuple[str, str] | None:
    """(user, password) from a Basic value, or None if absent or malformed."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return None
    return user, password
