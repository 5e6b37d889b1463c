"""Tunnel relays with real traffic: bulk data both ways intact, half-close, idle timeout.

Plain listeners splice (zero-copy, one idle clock for both directions); the TLS listener
copies through user space. Test origins listen on 127.0.9.2 (the in-process gateway allows
127.0.9.0/24) or on 127.0.0.1 behind an `egressd pop` process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from egressd.pop.runtime import PopOptions

from .helpers import (
    IO_TIMEOUT,
    by_client_port,
    close_writer,
    credentials,
    http_connect,
    local_port,
    pop_plain,
    pop_tls,
    read_all,
    socks5_connect,
    tcp_server,
    wait_flow,
)
from .processes import DEVICE, SECRET, Start, start_pop

ORIGIN_HOST = "127.0.9.2"
SIZE = 20 * 1024 * 1024
BULK_SECONDS = 60.0
SHORT_IDLE = pytest.param({"options": PopOptions(idle_timeout=1.0)}, id="idle-1s")


class Bulk:
    """Both ends send `size` random bytes and hash the `size` bytes they receive. Framed by
    length, not by EOF: a TLS client cannot half-close its side of the tunnel."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.client_payload = os.urandom(size)
        self.origin_payload = os.urandom(size)
        self.origin_received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> str:
        async def send() -> None:
            view = memoryview(payload)
            for offset in range(0, len(view), 1 << 20):
                writer.write(view[offset:offset + (1 << 20)])
                await writer.drain()

        async def receive() -> str:
            digest = hashlib.sha256()
            remaining = self.size
            while remaining:
                chunk = await reader.read(min(remaining, 1 << 18))
                if not chunk:
                    raise AssertionError(f"EOF with {remaining} bytes still to come")
                digest.update(chunk)
                remaining -= len(chunk)
            return digest.hexdigest()

        async with asyncio.TaskGroup() as group:
            group.create_task(send())
            received = group.create_task(receive())
        return received.result()

    async def origin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            digest = await self._pump(reader, writer, self.origin_payload)
        except BaseException as exc:
            if not self.origin_received.done():
                self.origin_received.set_exception(AssertionError(f"origin failed: {exc!r}"))
            raise
        self.origin_received.set_result(digest)
        await reader.read(-1)  # until the client closes: the client ends the tunnel

    async def check_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(BULK_SECONDS):
            client_received = await self._pump(reader, writer, self.client_payload)
            origin_received = await self.origin_received
        assert client_received == hashlib.sha256(self.origin_payload).hexdigest()
        assert origin_received == hashlib.sha256(self.client_payload).hexdigest()


async def test_20_mb_both_ways_through_a_connect_tunnel_of_egressd_pop(
    egressd_process: Start, tmp_path: Any,
) -> None:
    pop = await start_pop(egressd_process, tmp_path)
    bulk = Bulk(SIZE)
    async with tcp_server("127.0.0.1", bulk.origin) as origin:
        response, reader, writer = await http_connect(pop.address, f"{origin[0]}:{origin[1]}", (DEVICE, SECRET))
        assert response.status == 200
        port = local_port(writer)
        try:
            await bulk.check_client(reader, writer)
        finally:
            await close_writer(writer)
    flow = await wait_flow(pop.flow_log, by_client_port(port))
    assert flow["bytes_up"] == flow["bytes_down"] == SIZE
    assert flow["source"].startswith("127.0.0.2:") and flow["outcome"] == "ok"


@pytest.mark.parametrize("listener", ["plain", "tls"])
async def test_20_mb_both_ways_through_the_in_process_gateway(serve: dict[str, Any], listener: str) -> None:
    """acme's tunnel crosses the backbone to lax and leaves from 127.0.2.100."""
    bulk = Bulk(SIZE)
    seen: list[str] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        await bulk.origin(reader, writer)

    context = ssl.create_default_context(cafile=serve["ca_cert"]) if listener == "tls" else None
    proxy = pop_tls(serve) if listener == "tls" else pop_plain(serve)
    async with tcp_server(ORIGIN_HOST, origin) as address:
        response, reader, writer = await http_connect(proxy, f"{address[0]}:{address[1]}",
                                                      credentials(serve, "acme"), ssl_context=context)
        assert response.status == 200
        port = local_port(writer)
        try:
            await bulk.check_client(reader, writer)
        finally:
            await close_writer(writer)
    assert seen == ["127.0.2.100"]
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["bytes_up"] == flow["bytes_down"] == SIZE
    assert (flow["egress_pop"], flow["path"]) == ("lax", "backbone")


# --- half-close ------------------------------------------------------------------------


async def ask_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The origin reads the whole question (until EOF), then answers and closes."""
    question = await reader.read(-1)
    writer.write(b"answer to " + question)
    await writer.drain()


def tunnel_openers(info: dict[str, Any]) -> dict[str, Callable[[tuple[str, int]], Any]]:
    async def connect(origin: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        response, reader, writer = await http_connect(pop_plain(info), f"{origin[0]}:{origin[1]}",
                                                      credentials(info, "acme"))
        assert response.status == 200
        return reader, writer

    async def socks5(origin: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reply, reader, writer = await socks5_connect(pop_plain(info), credentials(info, "acme"), *origin)
        assert reply == 0
        return reader, writer

    return {"connect": connect, "socks5": socks5}


@pytest.mark.parametrize("kind", ["connect", "socks5"])
async def test_client_half_close_still_gets_the_answer(serve: dict[str, Any], kind: str) -> None:
    async with tcp_server(ORIGIN_HOST, ask_after_eof) as origin:
        reader, writer = await tunnel_openers(serve)[kind](origin)
        port = local_port(writer)
        try:
            writer.write(b"the question")
            writer.write_eof()  # shutdown(SHUT_WR): the tunnel must stay open for the answer
            assert await read_all(reader) == b"answer to the question"
        finally:
            await close_writer(writer)
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["closed_by"] == "client" and flow["outcome"] == "ok"
    assert (flow["bytes_up"], flow["bytes_down"]) == (12, 22)


async def test_upstream_half_close_lets_the_client_keep_sending(serve: dict[str, Any]) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greets_then_listens(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello, then EOF")
        writer.write_eof()
        received.set_result(await reader.read(-1))

    async with tcp_server(ORIGIN_HOST, greets_then_listens) as origin:
        reader, writer = await tunnel_openers(serve)["connect"](origin)
        port = local_port(writer)
        try:
            assert await read_all(reader) == b"hello, then EOF"
            writer.write(b"late words")
            writer.write_eof()
            async with asyncio.timeout(IO_TIMEOUT):
                assert await received == b"late words"
        finally:
            await close_writer(writer)
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["closed_by"] == "upstream"


# --- idle timeout ----------------------------------------------------------------------


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(-1)


async def open_tunnel(info: dict[str, Any], listener: str, origin: tuple[str, int],
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = ssl.create_default_context(cafile=info["ca_cert"]) if listener == "tls" else None
    proxy = pop_tls(info) if listener == "tls" else pop_plain(info)
    response, reader, writer = await http_connect(proxy, f"{origin[0]}:{origin[1]}",
                                                  credentials(info, "globex"), ssl_context=context)
    assert response.status == 200
    return reader, writer


@pytest.mark.parametrize("serve", [SHORT_IDLE], indirect=True)
@pytest.mark.parametrize("listener", ["plain", "tls"])
async def test_idle_tunnel_is_closed_after_the_idle_timeout(serve: dict[str, Any], listener: str) -> None:
    async with tcp_server(ORIGIN_HOST, silent) as origin:
        started = time.monotonic()
        reader, writer = await open_tunnel(serve, listener, origin)
        port = local_port(writer)
        try:
            assert await read_all(reader, IO_TIMEOUT) == b""  # no traffic either way
        finally:
            await close_writer(writer)
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5.0  # idle 1 s, swept every 1 s
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["closed_by"] == "idle-timeout" and flow["bytes_up"] == flow["bytes_down"] == 0


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Sends one byte every 0.2 s for 3 s (three idle timeouts), then closes."""
    for _ in range(15):
        writer.write(b".")
        await writer.drain()
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("serve", [SHORT_IDLE], indirect=True)
@pytest.mark.parametrize("listener", [
    "plain",
    "tls",
])
async def test_one_way_traffic_keeps_a_tunnel_alive(serve: dict[str, Any], listener: str) -> None:
    async with tcp_server(ORIGIN_HOST, trickle) as origin:
        reader, writer = await open_tunnel(serve, listener, origin)
        port = local_port(writer)
        try:
            assert await read_all(reader, IO_TIMEOUT) == b"." * 15
        finally:
            await close_writer(writer)
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["closed_by"] == "upstream" and flow["bytes_down"] == 15


# --- resets ----------------------------------------------------------------------------


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_client_reset_ends_the_tunnel_and_the_upstream(serve: dict[str, Any]) -> None:
    upstream_ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def waits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while chunk := await reader.read(65536):
                data += chunk
        finally:
            if not upstream_ended.done():
                upstream_ended.set_result(data)

    async with tcp_server(ORIGIN_HOST, waits) as origin:
        _reader, writer = await tunnel_openers(serve)["connect"](origin)
        port = local_port(writer)
        writer.write(b"some bytes")
        await writer.drain()
        reset(writer)
        async with asyncio.timeout(IO_TIMEOUT):
            received = await upstream_ended  # the PoP closed the origin's side too
        assert b"some bytes".startswith(received)  # an RST may discard bytes not yet relayed
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["closed_by"] == "client"


async def test_upstream_reset_ends_the_tunnel_for_the_client(serve: dict[str, Any]) -> None:
    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"bye")
        await writer.drain()
        reset(writer)

    async with tcp_server(ORIGIN_HOST, resets) as origin:
        reader, writer = await tunnel_openers(serve)["connect"](origin)
        port = local_port(writer)
        try:
            writer.write(b"hello")
            received = await read_all(reader)
        finally:
            await close_writer(writer)
    assert received in (b"", b"bye")  # an RST may overtake the bytes before it
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["closed_by"] == "upstream"
