"""Malformed and hostile client input on a PoP's listeners, over raw TCP: the exact answer
(HTTP status or SOCKS5 reply), a close, and nothing left behind (descriptors, tasks)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any

import pytest

from egressd.pop.runtime import PopOptions
from egressd.protocols.socks5 import build_udp_datagram

from .helpers import (
    basic,
    close_writer,
    credentials,
    host_port,
    no_leaks,
    open_tcp,
    pop_plain,
    pop_tls,
    read_all,
    read_response,
    socks5_address,
    socks5_login,
    socks5_udp,
)

SHORT_HANDSHAKE = pytest.param({"options": PopOptions(handshake_timeout=1.0)}, id="handshake-1s")


async def exchange(address: tuple[str, int], data: bytes, *, half_close: bool = True) -> bytes:
    """Send `data`, optionally shut our write side, and read everything until the PoP closes."""
    reader, writer = await open_tcp(address)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await read_all(reader)
    finally:
        await close_writer(writer)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def echo_url(info: dict[str, Any]) -> str:
    return info["echo"]["http"]


# --- HTTP ----------------------------------------------------------------------------


async def test_truncated_request_head_then_close_is_400(serve: dict[str, Any]) -> None:
    async with no_leaks():
        head = f"GET {echo_url(serve)} HTTP/1.1\r\nHost: 127.0.9.1\r\n".encode()
        response = await exchange(pop_plain(serve), head)
        assert status_of(response) == 400


async def test_truncated_second_request_head_then_close_is_400(serve: dict[str, Any]) -> None:
    """The same truncated head after a complete keep-alive request is answered 400."""
    async with no_leaks():
        reader, writer = await open_tcp(pop_plain(serve))
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: pop\r\n\r\n")
            first = await read_response(reader)
            assert first.status == 200
            writer.write(f"GET {echo_url(serve)} HTTP/1.1\r\nHost: 127.0.9.1\r\n".encode())
            writer.write_eof()
            response = await read_all(reader)
        finally:
            await close_writer(writer)
        assert status_of(response) == 400


async def test_truncated_request_head_then_reset_leaves_nothing(serve: dict[str, Any]) -> None:
    async with no_leaks():
        _reader, writer = await open_tcp(pop_plain(serve))
        writer.write(b"GET http://127.0.9.1/ HTTP/1.1\r\nHo")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST
        await asyncio.sleep(0)


async def test_oversized_request_line_is_414(serve: dict[str, Any]) -> None:
    async with no_leaks():
        line = f"GET http://127.0.9.1/{'a' * 9000} HTTP/1.1\r\n".encode()
        response = await exchange(pop_plain(serve), line + b"Host: 127.0.9.1\r\n\r\n")
        assert status_of(response) == 414
        assert b"connection: close" in response.lower()


async def test_oversized_request_line_is_414_before_it_ends(serve: dict[str, Any]) -> None:
    """The limit is enforced while the line arrives: no need to wait for its end."""
    async with no_leaks():
        reader, writer = await open_tcp(pop_plain(serve))
        try:
            writer.write(b"GET http://127.0.9.1/" + b"a" * 9000)  # no CRLF, connection open
            response = await read_all(reader)
        finally:
            await close_writer(writer)
        assert status_of(response) == 414


async def test_oversized_header_section_is_431(serve: dict[str, Any]) -> None:
    async with no_leaks():
        fields = b"".join(b"X-Filler-%d: %s\r\n" % (index, b"v" * 1000) for index in range(70))
        request = b"GET http://127.0.9.1/ HTTP/1.1\r\nHost: 127.0.9.1\r\n" + fields + b"\r\n"
        assert len(request) > 64 * 1024
        response = await exchange(pop_plain(serve), request)
        assert status_of(response) == 431


async def test_too_many_header_fields_is_431(serve: dict[str, Any]) -> None:
    async with no_leaks():
        fields = b"".join(b"X-F%d: 1\r\n" % index for index in range(150))
        response = await exchange(pop_plain(serve), b"GET http://127.0.9.1/ HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
        assert status_of(response) == 431


@pytest.mark.parametrize("authenticated", [False, True], ids=["anonymous", "authenticated"])
async def test_content_length_and_transfer_encoding_together_is_400(
    serve: dict[str, Any], authenticated: bool,
) -> None:
    """Request smuggling: both framings in one request is refused, never forwarded."""
    auth = f"Proxy-Authorization: {basic(*credentials(serve, 'acme'))}\r\n" if authenticated else ""
    request = (f"POST {echo_url(serve)} HTTP/1.1\r\nHost: 127.0.9.1\r\n{auth}"
               "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()
    async with no_leaks():
        response = await exchange(pop_plain(serve), request)
        assert status_of(response) == 400


@pytest.mark.parametrize(("name", "request_bytes", "status"), [
    ("bare-lf", b"GET http://127.0.9.1/ HTTP/1.1\nHost: a\n\n", 400),
    ("obs-fold", b"GET http://127.0.9.1/ HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("space-before-colon", b"GET http://127.0.9.1/ HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("two-content-lengths", b"POST http://127.0.9.1/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                            b"Content-Length: 2\r\n\r\nab", 400),
    ("negative-content-length", b"POST http://127.0.9.1/ HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("nul-in-request-line", b"GET http://127.0.9.1/\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("unknown-transfer-coding", b"POST http://127.0.9.1/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: zstd\r\n\r\n", 501),
    ("http-version-2", b"GET http://127.0.9.1/ HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("connect-without-port", b"CONNECT 127.0.9.1 HTTP/1.1\r\nHost: 127.0.9.1\r\n\r\n", 400),
    ("decimal-ip-host", b"CONNECT 2130706433:80 HTTP/1.1\r\nHost: 2130706433:80\r\n\r\n", 400),
    ("short-ip-host", b"GET http://127.1/ HTTP/1.1\r\nHost: 127.1\r\n\r\n", 400),
])
async def test_malformed_request_gets_its_status(
    serve: dict[str, Any], name: str, request_bytes: bytes, status: int,
) -> None:
    async with no_leaks():
        response = await exchange(pop_plain(serve), request_bytes)
        assert status_of(response) == status, name


# --- SOCKS5 --------------------------------------------------------------------------


async def test_socks4_request_gets_no_socks_success_and_is_closed(serve: dict[str, Any]) -> None:
    async with no_leaks():
        # SOCKS4 CONNECT 127.0.9.1:80, user "x": version byte 0x04.
        response = await exchange(pop_plain(serve), b"\x04\x01\x00\x50\x7f\x00\x09\x01x\x00",
                                  half_close=False)
        assert response[:2] not in (b"\x05\x00", b"\x00\x5a")
        assert not response.startswith(b"\x05")


async def test_socks5_greeting_with_no_methods_is_refused(serve: dict[str, Any]) -> None:
    async with no_leaks():
        assert await exchange(pop_plain(serve), b"\x05\x00", half_close=False) == b"\x05\xff"


async def test_socks5_offering_only_no_auth_is_refused(serve: dict[str, Any]) -> None:
    async with no_leaks():
        assert await exchange(pop_plain(serve), b"\x05\x01\x00", half_close=False) == b"\x05\xff"


async def test_socks5_offering_gssapi_and_no_auth_is_refused(serve: dict[str, Any]) -> None:
    async with no_leaks():
        assert await exchange(pop_plain(serve), b"\x05\x02\x00\x01", half_close=False) == b"\x05\xff"


def _request(command: int, rest: bytes) -> bytes:
    return bytes([5, command, 0]) + rest


@pytest.mark.parametrize(("name", "request_bytes", "reply"), [
    ("bind", _request(2, socks5_address("127.0.9.1", 80)), 0x07),
    ("unknown-command", _request(9, socks5_address("127.0.9.1", 80)), 0x07),
    ("unknown-address-type", _request(1, b"\x02\x7f\x00\x09\x01\x00\x50"), 0x08),
    ("reserved-byte", b"\x05\x01\x01" + socks5_address("127.0.9.1", 80), 0x01),
    ("empty-domain", _request(1, b"\x03\x00\x00\x50"), 0x01),
    ("port-0", _request(1, socks5_address("127.0.9.1", 0)), 0x01),
    ("decimal-ip-domain", _request(1, socks5_address("2130706433", 80)), 0x01),
    ("nul-in-domain", _request(1, b"\x03\x05ab\x00cd\x00\x50"), 0x01),
])
async def test_malformed_socks5_request_gets_its_reply(
    serve: dict[str, Any], name: str, request_bytes: bytes, reply: int,
) -> None:
    async with no_leaks():
        reader, writer = await open_tcp(pop_plain(serve))
        try:
            assert await socks5_login(reader, writer, *credentials(serve, "acme")) == b"\x01\x00"
            writer.write(request_bytes)
            answer = await read_all(reader)
        finally:
            await close_writer(writer)
        assert answer[:3] == bytes([5, reply, 0]), (name, answer)


async def test_socks5_request_with_wrong_version_is_closed_without_reply(serve: dict[str, Any]) -> None:
    async with no_leaks():
        reader, writer = await open_tcp(pop_plain(serve))
        try:
            assert await socks5_login(reader, writer, *credentials(serve, "acme")) == b"\x01\x00"
            writer.write(b"\x04\x01\x00" + socks5_address("127.0.9.1", 80))
            assert await read_all(reader) == b""
        finally:
            await close_writer(writer)


async def test_socks5_auth_with_wrong_subnegotiation_version_is_closed(serve: dict[str, Any]) -> None:
    async with no_leaks():
        answer = await exchange(pop_plain(serve), b"\x05\x01\x02\x05\x01a\x01b", half_close=False)
        assert answer == b"\x05\x02"  # method chosen, then a close with no auth status


async def test_udp_fragments_are_dropped_and_the_association_keeps_working(serve: dict[str, Any]) -> None:
    echo = host_port(serve["echo"]["udp"])
    async with no_leaks(), socks5_udp(pop_plain(serve), credentials(serve, "acme")) as udp:
        for frag in (1, 2, 0x81):
            udp.send(*echo, b"fragment", frag=frag)
        udp.transport.sendto(b"\x00\x00", udp.relay)  # truncated header
        udp.transport.sendto(b"\x01\x00\x00" + socks5_address(*echo) + b"x", udp.relay)  # RSV != 0
        with pytest.raises(TimeoutError):
            await udp.recv(within=0.5)
        udp.send(*echo, b"whole")
        _host, _port, payload = await udp.recv()
        assert payload.split()[0] == b"127.0.2.100"


async def test_udp_datagrams_from_another_client_port_are_dropped(serve: dict[str, Any]) -> None:
    """The association named its client port: a stranger on the same host is ignored."""
    echo = host_port(serve["echo"]["udp"])
    async with no_leaks(), socks5_udp(pop_plain(serve), credentials(serve, "acme")) as udp:
        loop = asyncio.get_running_loop()
        received: list[bytes] = []

        class Stranger(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                received.append(data)

        transport, _ = await loop.create_datagram_endpoint(Stranger, local_addr=("127.0.0.1", 0))
        try:
            transport.sendto(build_udp_datagram(*echo, b"stranger"), udp.relay)
            udp.send(*echo, b"owner")
            _host, _port, payload = await udp.recv()
            assert payload.split()[0] == b"127.0.2.100"
            with pytest.raises(TimeoutError):
                await udp.recv(within=0.3)
            assert received == []
        finally:
            transport.close()


# --- slow clients --------------------------------------------------------------------


async def closed_after(address: tuple[str, int], data: bytes, limit: float = 8.0) -> tuple[float, bytes]:
    """Send `data` and nothing else; (seconds until the PoP closed, what it answered)."""
    reader, writer = await open_tcp(address)
    started = time.monotonic()
    try:
        if data:
            writer.write(data)
        answer = await read_all(reader, within=limit)
    finally:
        await close_writer(writer)
    return time.monotonic() - started, answer


@pytest.mark.parametrize("serve", [SHORT_HANDSHAKE], indirect=True)
async def test_slow_http_client_is_closed_after_the_handshake_timeout(serve: dict[str, Any]) -> None:
    async with no_leaks():
        elapsed, answer = await closed_after(pop_plain(serve), b"GET http://127.0.9.1/ HTTP/1.1\r\nHost: 12")
        assert 0.9 <= elapsed < 5.0
        assert status_of(answer) == 408


@pytest.mark.parametrize("serve", [SHORT_HANDSHAKE], indirect=True)
@pytest.mark.parametrize("data", [b"", b"\x05", b"\x05\x01\x02", b"\x05\x01\x02\x01\x05acme"],
                         ids=["silent", "socks-version-only", "socks-greeting", "socks-half-auth"])
async def test_slow_client_is_closed_after_the_handshake_timeout(serve: dict[str, Any], data: bytes) -> None:
    async with no_leaks():
        elapsed, answer = await closed_after(pop_plain(serve), data)
        assert 0.9 <= elapsed < 5.0
        assert answer in (b"", b"\x05\x02")


@pytest.mark.parametrize("serve", [SHORT_HANDSHAKE], indirect=True)
async def test_authenticated_socks5_client_without_request_is_closed(serve: dict[str, Any]) -> None:
    async with no_leaks():
        reader, writer = await open_tcp(pop_plain(serve))
        started = time.monotonic()
        try:
            assert await socks5_login(reader, writer, *credentials(serve, "acme")) == b"\x01\x00"
            assert await read_all(reader, within=8.0) == b""
        finally:
            await close_writer(writer)
        assert 0.9 <= time.monotonic() - started < 5.0


@pytest.mark.parametrize("serve", [SHORT_HANDSHAKE], indirect=True)
async def test_silent_client_on_the_tls_listener_is_closed(serve: dict[str, Any]) -> None:
    async with no_leaks():
        elapsed, answer = await closed_after(pop_tls(serve), b"")
        assert elapsed < 5.0 and answer == b""


@pytest.mark.parametrize("serve", [SHORT_HANDSHAKE], indirect=True)
async def test_slow_http_client_on_the_tls_listener_is_closed(serve: dict[str, Any]) -> None:
    context = ssl.create_default_context(cafile=serve["ca_cert"])
    async with no_leaks():
        reader, writer = await asyncio.open_connection(*pop_tls(serve), ssl=context,
                                                       server_hostname="localhost")
        started = time.monotonic()
        try:
            writer.write(b"GET http://127.0.9.1/ HTTP/1.1\r\nHo")
            answer = await read_all(reader, within=8.0)
        finally:
            await close_writer(writer)
        assert 0.9 <= time.monotonic() - started < 5.0
        assert status_of(answer) == 408


async def test_plain_http_on_the_tls_listener_is_closed(serve: dict[str, Any]) -> None:
    async with no_leaks():
        elapsed, _answer = await closed_after(pop_tls(serve), b"GET http://127.0.9.1/ HTTP/1.1\r\n\r\n")
        assert elapsed < 5.0
