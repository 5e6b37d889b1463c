"""The echo origin's answers: pure functions of what it knows about a client.

`echo/server.py` is the I/O shell around them (HTTP/1.1, UDP, HTTP/3).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from egressd.protocols.geofeed import GeofeedIndex
from egressd.protocols.proxy_v2 import SIGNATURE, ProxyV2Error, looks_like_proxy_v2, parse_proxy_v2


@dataclass(frozen=True, slots=True)
class ClientView:
    """What the echo knows about one client.

    ``address``/``port`` are the logical source (from the PROXY header when there was
    one), ``peer`` the physical peer. ``http`` is ``"1.1"``, ``"1.0"`` or ``"3"``.
    """

    address: str
    port: int
    peer: tuple[str, int]
    proxy_protocol: bool
    http: str
    link: str | None = None  # the interface the packets arrived on (lab: the egress PoP)


@dataclass(frozen=True, slots=True)
class EchoResponse:
    """An answer, independent of the HTTP version that carries it."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def normalize_address(host: str) -> str:
    """The address as people write it: IPv4-mapped IPv6 (dual-stack sockets) as IPv4."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def render_trace(client: ClientView, geofeed: GeofeedIndex | None) -> str:
    """``key=value`` lines: ``ip family port proxy_protocol [peer] http [geo...]``.

    ``peer`` appears only with a PROXY header; ``country region city [postal]`` only
    when a geofeed is loaded and places the address.
    """
    address = normalize_address(client.address)
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    lines = [
        f"ip={address}",
        f"family={ip.version if ip is not None else 0}",
        f"port={client.port}",
        f"proxy_protocol={'yes' if client.proxy_protocol else 'no'}",
    ]
    if client.proxy_protocol:
        lines.append(f"peer={normalize_address(client.peer[0])}")
    lines.append(f"http={client.http}")
    if client.link is not None:
        lines.append(f"link={client.link}")
    entry = geofeed.lookup(ip) if geofeed is not None and ip is not None else None
    if entry is not None:
        lines += [f"country={entry.country}", f"region={entry.region}", f"city={entry.city}"]
        if entry.postal:
            lines.append(f"postal={entry.postal}")
    return "\n".join(lines) + "\n"


TEXT_HEADERS: Final = (
    ("content-type", "text/plain; charset=utf-8"),
    # An address echo must never be answered from a cache along the way.
    ("cache-control", "no-store"),
)


def respond(
    method: str, target: str, client: ClientView, geofeed: GeofeedIndex | None
) -> EchoResponse:
    """The answer to ``method target`` (query strings ignored). HEAD gets GET's headers."""
    path = target.split("?", 1)[0]
    if path not in ("/", "/trace"):
        return EchoResponse(404, b"not found\n", TEXT_HEADERS)
    if method not in ("GET", "HEAD"):
        return EchoResponse(405, b"method not allowed\n", (*TEXT_HEADERS, ("allow", "GET, HEAD")))
    if path == "/":
        body = normalize_address(client.address) + "\n"
    else:
        body = render_trace(client, geofeed)
    return EchoResponse(200, body.encode(), TEXT_HEADERS)


def udp_reply(datagram: bytes, peer: tuple[str, int], accept_proxy_v2: bool,
              link: str | None = None) -> bytes | None:
    """The answer to one datagram, or None to drop it (a broken PROXY header).
    With `link` (the arrival interface), a third field ``link=NAME``."""
    address, port = peer
    if accept_proxy_v2 and len(datagram) >= len(SIGNATURE) and looks_like_proxy_v2(datagram):
        try:
            header = parse_proxy_v2(datagram)
        except ProxyV2Error:
            return None
        if header is None:
            return None  # truncated: a datagram never continues
        if header.source is not None:
            address, port = header.source
    if link is not None:
        return f"{normalize_address(address)} {port} link={link}\n".encode()
    return f"{normalize_address(address)} {port}\n".encode()
