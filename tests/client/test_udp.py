"""UDP through the client: SOCKS5 UDP ASSOCIATE on the local proxy, carried to the PoP as
CONNECT-UDP streams (RFC 9298) of the device link, leaving as the decision says (R3)."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from egressd.protocols.socks5 import build_udp_datagram, parse_udp_datagram

from .conftest import Enroll, Spawn, admin, start_client

ACME_UDP_SOURCE = {"las": "127.0.2.100", "lax": "127.0.2.100", "jfk": "127.0.3.100"}
GLOBEX_UDP_SOURCE = {"las": ("127.0.1.1", "127.0.1.2"), "lax": ("127.0.2.1",), "jfk": ("127.0.3.1",)}


class Replies(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def associate(listen: str) -> tuple[asyncio.StreamWriter, tuple[str, int]]:
    host, port = listen.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
    reply = await reader.readexactly(10)
    assert reply[:2] == b"\x05\x00", reply
    return writer, (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])


async def echo_source(listen: str, echo: str, *, hostname: str | None = None) -> str:
    """Send one datagram through the client's UDP relay; the echo's answer (source seen)."""
    control, relay = await associate(listen)
    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_datagram_endpoint(Replies, local_addr=("127.0.0.1", 0))
    try:
        host, port = echo.rsplit(":", 1)
        frame = build_udp_datagram(hostname or host, int(port), b"ping")
        for _ in range(20):  # UDP: resend until an answer comes
            transport.sendto(frame, relay)
            try:
                async with asyncio.timeout(0.5):
                    datagram = parse_udp_datagram(await replies.queue.get())
            except TimeoutError:
                continue
            assert (datagram.host, datagram.port) == (host, int(port)) or hostname
            return datagram.payload.decode().split()[0]
        raise AssertionError("no answer through the client's UDP relay")
    finally:
        transport.close()
        control.close()


async def test_udp_leaves_from_the_dedicated_address_for_acme_and_shared_for_globex(
        serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    _acme, acme_status = await start_client(spawn, await enroll("acme"))
    _globex, globex_status = await start_client(spawn, await enroll("globex"))
    echo = serve["echo"]["udp"]
    assert await echo_source(acme_status["listen"], echo) == ACME_UDP_SOURCE[acme_status["connected_pop"]]
    assert await echo_source(globex_status["listen"], echo) in GLOBEX_UDP_SOURCE[globex_status["connected_pop"]]
    # A name is resolved by the PoP, as for TCP.
    named = await echo_source(acme_status["listen"], echo, hostname="echo.egressd.test")
    assert named == ACME_UDP_SOURCE[acme_status["connected_pop"]]
    stack = serve["stack"]
    link = stack.device_links[acme_status["connected_pop"]]
    assert link.server.connections_accepted >= 1


async def test_udp_leaves_from_a_shared_address_when_proxy_udp_is_off(
        serve: dict[str, Any], enroll: Enroll, spawn: Spawn) -> None:
    """R3: UDP uses dedicated egress only with proxy.udp on."""
    _acme, status = await start_client(spawn, await enroll("acme"))
    async with admin(serve) as api:
        response = await api.patch("/v1/accounts/acme/settings/network", json={"proxy_udp": False})
        assert response.status_code == 200, response.text
    shared = {"las": ("127.0.1.1", "127.0.1.2"), "lax": ("127.0.2.1",), "jfk": ("127.0.3.1",)}
    deadline = asyncio.get_running_loop().time() + 5  # R14: in force within 2 s
    source = ""
    while asyncio.get_running_loop().time() < deadline:
        source = await echo_source(status["listen"], serve["echo"]["udp"])
        if source in shared[status["connected_pop"]]:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"UDP still leaves from {source} with proxy.udp off")
