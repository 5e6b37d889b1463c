"""Admission caps and authentication throttling against the real PoPs of `serve` (issue 9):
handshakes per source, flows per account and per source, failed logins per source; and no
descriptor or task left behind by a few thousand hostile connections."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from typing import Any

import pytest

from egressd.pop.admission import AdmissionLimits
from egressd.pop.runtime import PopOptions

from .helpers import (
    IO_TIMEOUT,
    close_writer,
    credentials,
    host_port,
    http_connect,
    no_leaks,
    pop_plain,
    read_all,
    socks5_login,
    socks5_request,
)


def limits(**values: Any) -> Any:
    return pytest.param({"options": PopOptions(handshake_timeout=2.0,
                                               limits=AdmissionLimits(**values))},
                        id="-".join(f"{k}={v}" for k, v in values.items()))


def echo_authority(serve: dict[str, Any]) -> str:
    host, port = host_port(serve["echo"]["http"])
    return f"{host}:{port}"


async def connect_from(address: tuple[str, int], source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return await asyncio.open_connection(sock=sock)


@pytest.mark.parametrize("serve", [limits(auth_failures_per_source=3, auth_failure_window=1.5)],
                         indirect=True)
async def test_failed_logins_are_rate_limited_per_source(serve: dict[str, Any]) -> None:
    proxy, target = pop_plain(serve), echo_authority(serve)
    user, secret = credentials(serve, "acme")
    for _ in range(3):
        response, _reader, writer = await http_connect(proxy, target, (user, "wrong-secret"))
        await close_writer(writer)
        assert response.status == 407
    # Past the limit even the right secret is refused, over HTTP and SOCKS5 alike...
    response, _reader, writer = await http_connect(proxy, target, (user, secret))
    await close_writer(writer)
    assert response.status == 407
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        assert await socks5_login(reader, writer, user, secret) == b"\x01\x01"
    finally:
        await close_writer(writer)
    # ...while another source address is not affected,
    reader, writer = await connect_from(proxy, "127.0.6.1")
    try:
        assert await socks5_login(reader, writer, user, secret) == b"\x01\x00"
    finally:
        await close_writer(writer)
    # and the window ends.
    await asyncio.sleep(1.6)
    response, _reader, writer = await http_connect(proxy, target, (user, secret))
    await close_writer(writer)
    assert response.status == 200


@pytest.mark.parametrize("serve", [limits(max_flows_per_account=2)], indirect=True)
async def test_flows_per_account_are_capped(serve: dict[str, Any]) -> None:
    proxy, target = pop_plain(serve), echo_authority(serve)
    auth = credentials(serve, "acme")
    tunnels = []
    try:
        for _ in range(2):
            response, _reader, writer = await http_connect(proxy, target, auth)
            assert response.status == 200
            tunnels.append(writer)
        response, _reader, writer = await http_connect(proxy, target, auth)
        await close_writer(writer)
        assert response.status == 429
        # Another account is not affected.
        response, _reader, writer = await http_connect(proxy, target, credentials(serve, "globex"))
        tunnels.append(writer)
        assert response.status == 200
        # A slot freed is a slot to use.
        await close_writer(tunnels.pop(0))
        for _ in range(50):
            response, _reader, writer = await http_connect(proxy, target, auth)
            if response.status == 200:
                tunnels.append(writer)
                break
            await close_writer(writer)
            await asyncio.sleep(0.05)
        assert response.status == 200
    finally:
        for writer in tunnels:
            await close_writer(writer)


@pytest.mark.parametrize("serve", [limits(max_flows_per_source=1)], indirect=True)
async def test_flows_per_source_are_capped_and_socks5_says_not_allowed(serve: dict[str, Any]) -> None:
    proxy, target = pop_plain(serve), echo_authority(serve)
    response, _reader, first = await http_connect(proxy, target, credentials(serve, "acme"))
    try:
        assert response.status == 200
        reader, writer = await asyncio.open_connection(*proxy)
        try:
            assert await socks5_login(reader, writer, *credentials(serve, "globex")) == b"\x01\x00"
            host, port = host_port(serve["echo"]["http"])
            writer.write(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
            reply = await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT)
            assert reply == b"\x05\x02"  # connection not allowed by ruleset
        finally:
            await close_writer(writer)
    finally:
        await close_writer(first)


@pytest.mark.parametrize("serve", [limits(max_handshakes_per_source=5)], indirect=True)
async def test_unfinished_handshakes_are_capped_per_source(serve: dict[str, Any]) -> None:
    proxy = pop_plain(serve)
    slow = []
    try:
        for _ in range(5):
            reader, writer = await connect_from(proxy, "127.0.7.1")
            writer.write(b"CONNECT 127.0.9.1:80 HTTP/1.1\r\n")  # and never the rest
            slow.append((reader, writer))
        await asyncio.sleep(0.2)
        reader, writer = await connect_from(proxy, "127.0.7.1")
        try:
            assert await read_all(reader, within=2.0) == b""  # closed at accept
        finally:
            await close_writer(writer)
        # Other sources get through while these five stall.
        response, _reader, writer = await http_connect(proxy, echo_authority(serve),
                                                       credentials(serve, "acme"))
        await close_writer(writer)
        assert response.status == 200
        # The stalled ones end at the handshake timeout (2 s), and free their slots.
        for reader, _writer in slow:
            answer = await read_all(reader, within=5.0)
            assert answer.startswith(b"HTTP/1.1 408")
    finally:
        for _reader, writer in slow:
            await close_writer(writer)


HOSTILE: list[bytes] = [
    b"GET http://127.0.9.1/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"CONNECT 127.0.9.1:0 HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.9.1:65536 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x00\x01\x02\x03garbage\r\n\r\n",
    b"GET http://127.0.9.1/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    b"GET http://user:pw@127.0.9.1/ HTTP/1.1\r\n\r\n",
    b"\x05\x00",
    b"\x05\x01\x02\x01\x04acme\x04nope",
    b"\x05\x02\x00\x02\x05\x09\x00\x03\x00\x00\x50",
    b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
    b"GET http://127.0.9.1/ HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    b"CONNECT 127.0.9.1:80 HTTP/1.1\r\nProxy-Authorization: Basic !!!\r\n\r\n",
    b"",
]


async def hostile(address: tuple[str, int], payload: bytes, rng: random.Random) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        reader, writer = await asyncio.open_connection(*address)
        try:
            if payload:
                writer.write(payload)
            if rng.random() < 0.3:  # reset instead of reading the answer
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.transport.abort()
                return
            async with asyncio.timeout(3.0):
                await reader.read(65536)
        finally:
            writer.close()


@pytest.mark.parametrize("serve", [limits(max_handshakes_per_source=4096, auth_failures_per_source=0)],
                         indirect=True)
async def test_thousands_of_hostile_connections_leave_nothing_behind(serve: dict[str, Any]) -> None:
    proxy = pop_plain(serve)
    rng = random.Random(9)
    # Warm-up: the first flows create the PoP's long-lived things (pipe pool, metric children).
    await asyncio.gather(*(hostile(proxy, payload, rng) for payload in HOSTILE))
    async with no_leaks(settle_seconds=5.0):
        for _ in range(20):  # 20 rounds x 150 connections = 3,000
            await asyncio.gather(*(hostile(proxy, rng.choice(HOSTILE), rng) for _ in range(150)))
    # And the PoP still serves.
    response, _reader, writer = await http_connect(proxy, echo_authority(serve),
                                                   credentials(serve, "acme"))
    await close_writer(writer)
    assert response.status == 200


@pytest.mark.parametrize("serve", [pytest.param(
    {"options": PopOptions(max_request_line=128, max_header_section=1024, max_header_fields=4)},
    id="small-heads")], indirect=True)
async def test_request_head_limits_are_configurable(serve: dict[str, Any]) -> None:
    proxy = pop_plain(serve)
    long_line = b"GET http://127.0.9.1/" + b"a" * 200 + b" HTTP/1.1\r\n\r\n"
    many_fields = b"GET http://127.0.9.1/ HTTP/1.1\r\n" + b"".join(
        b"X-%d: 1\r\n" % index for index in range(5)) + b"\r\n"
    big_section = b"GET http://127.0.9.1/ HTTP/1.1\r\nX-Big: " + b"b" * 1100 + b"\r\n\r\n"
    for request, status in ((long_line, b"414"), (many_fields, b"431"), (big_section, b"431")):
        reader, writer = await asyncio.open_connection(*proxy)
        try:
            writer.write(request)
            answer = await read_all(reader, within=IO_TIMEOUT)
        finally:
            await close_writer(writer)
        assert answer.startswith(b"HTTP/1.1 " + status), (request[:40], answer[:60])
    # Within the limits, the same request is served.
    response, _reader, writer = await http_connect(proxy, echo_authority(serve),
                                                   credentials(serve, "acme"))
    await close_writer(writer)
    assert response.status == 200


async def udp_associate(serve: dict[str, Any], account: str) -> tuple[int, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*pop_plain(serve))
    assert await socks5_login(reader, writer, *credentials(serve, account)) == b"\x01\x00"
    reply, _relay = await socks5_request(reader, writer, 3, "0.0.0.0", 0)
    return reply, writer


@pytest.mark.parametrize("serve", [limits(max_flows_per_account=1)], indirect=True)
async def test_udp_associations_hold_a_flow_slot(serve: dict[str, Any]) -> None:
    reply, first = await udp_associate(serve, "acme")
    assert reply == 0
    try:
        reply, second = await udp_associate(serve, "acme")
        await close_writer(second)
        assert reply == 0x02  # not allowed: the account's one slot is taken
        response, _reader, writer = await http_connect(pop_plain(serve), echo_authority(serve),
                                                       credentials(serve, "acme"))
        await close_writer(writer)
        assert response.status == 429
    finally:
        await close_writer(first)
    for _ in range(50):  # the slot comes back when the control connection closes
        reply, writer = await udp_associate(serve, "acme")
        await close_writer(writer)
        if reply == 0:
            break
        await asyncio.sleep(0.05)
    assert reply == 0
