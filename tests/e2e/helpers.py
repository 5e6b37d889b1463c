"""Clients and probes for the end-to-end tests: curl, raw HTTP/1.1 and SOCKS5 dialogues, a
SOCKS5 UDP client, an HTTP/3 client driven over that UDP client, the flow log, and leak checks.

Every wait is bounded (``asyncio.timeout``); nothing sleeps to synchronise except bounded
settle loops that poll for a condition.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated

from egressd.protocols.socks5 import build_udp_datagram, parse_udp_datagram

IO_TIMEOUT = 10.0  # a generous bound for one exchange on loopback, even under load


# --- addresses in serve.json ---------------------------------------------------------


def host_port(url: str) -> tuple[str, int]:
    """('127.0.0.1', 8080) from 'http://127.0.0.1:8080/...' or '127.0.0.1:8080'."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def pop_plain(info: dict[str, Any], code: str = "las") -> tuple[str, int]:
    return host_port(info["pops"][code]["http_proxy"])


def pop_tls(info: dict[str, Any], code: str = "las") -> tuple[str, int]:
    return host_port(info["pops"][code]["https_proxy"])


def credentials(info: dict[str, Any], account: str) -> tuple[str, str]:
    entry = info["accounts"][account]
    return entry["username"], entry["password"]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- curl ----------------------------------------------------------------------------


@dataclass
class CurlResult:
    returncode: int
    statuses: list[int]  # every response head, in order (CONNECT's 200 first with -p)
    headers: dict[str, str]  # of the last head, names lower-cased
    body: bytes
    stderr: str

    @property
    def status(self) -> int | None:
        return self.statuses[-1] if self.statuses else None


def _clean_env() -> dict[str, str]:
    """No proxy from the environment: the only proxy is the one on the command line."""
    return {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}


async def curl(*args: str, within: float = 20.0, heads: bool = True) -> CurlResult:
    """Run curl (-q: no ~/.curlrc); with `heads` (-i), split its output into heads and body."""
    binary = shutil.which("curl")
    assert binary is not None, "curl is needed by the end-to-end tests"
    process = await asyncio.create_subprocess_exec(
        binary, "-q", "-sS", *(["-i"] if heads else []), "--max-time", str(within - 5), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_clean_env(),
    )
    try:
        async with asyncio.timeout(within):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    statuses: list[int] = []
    headers: dict[str, str] = {}
    rest = out
    while heads and rest.startswith(b"HTTP/"):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        statuses.append(int(lines[0].split()[1]))
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode().strip().lower()] = value.decode().strip()
        if not sep:
            break
    return CurlResult(process.returncode or 0, statuses, headers, rest, err.decode(errors="replace"))


def parse_trace(body: bytes) -> dict[str, str]:
    """The echo's /trace answer: key=value lines."""
    return dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)


# --- raw HTTP/1.1 --------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


async def read_response(reader: asyncio.StreamReader, *, body: bool = True) -> Response:
    """One response head (and a Content-Length body) from a raw connection."""
    async with asyncio.timeout(IO_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        _version, status, *reason = lines[0].decode().split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode().strip().lower()] = value.decode().strip()
        payload = b""
        if body and "content-length" in headers:
            payload = await reader.readexactly(int(headers["content-length"]))
    return Response(int(status), reason[0] if reason else "", headers, payload)


async def read_all(reader: asyncio.StreamReader, within: float = IO_TIMEOUT) -> bytes:
    """Everything until EOF (a reset after data counts as EOF: the data was delivered)."""
    chunks: list[bytes] = []
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def open_tcp(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(IO_TIMEOUT):
        return await asyncio.open_connection(*address)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(IO_TIMEOUT):
            await writer.wait_closed()


def local_port(writer: asyncio.StreamWriter) -> int:
    return int(writer.get_extra_info("sockname")[1])


async def http_connect(
    proxy: tuple[str, int], authority: str, auth: tuple[str, str] | None, *,
    ssl_context: Any = None,
) -> tuple[Response, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send CONNECT; returns the proxy's answer and the open connection (a tunnel on 200)."""
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            *proxy, ssl=ssl_context, server_hostname="localhost" if ssl_context else None)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if auth is not None:
        lines.append(f"Proxy-Authorization: {basic(*auth)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    return await read_response(reader, body=False), reader, writer


async def http_get(
    proxy: tuple[str, int], url: str, auth: tuple[str, str] | None,
) -> tuple[Response, int]:
    """One absolute-form GET through the proxy on a fresh connection: (answer, client port)."""
    reader, writer = await open_tcp(proxy)
    try:
        authority = url.split("://", 1)[1].split("/", 1)[0]
        lines = [f"GET {url} HTTP/1.1", f"Host: {authority}", "Connection: close"]
        if auth is not None:
            lines.append(f"Proxy-Authorization: {basic(*auth)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        return await read_response(reader), local_port(writer)
    finally:
        await close_writer(writer)


# --- raw SOCKS5 ----------------------------------------------------------------------


def socks5_address(host: str, port: int) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return bytes([3, len(name)]) + name + port.to_bytes(2, "big")
    return bytes([1 if address.version == 4 else 4]) + address.packed + port.to_bytes(2, "big")


async def _read_socks5_address(reader: asyncio.StreamReader) -> tuple[str, int]:
    atyp = (await reader.readexactly(1))[0]
    if atyp == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    else:
        host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
    return host, int.from_bytes(await reader.readexactly(2), "big")


async def socks5_login(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str, password: str,
) -> bytes:
    """Greeting and RFC 1929 sub-negotiation; returns the 2-byte auth status (b'\\x01\\x00' ok)."""
    async with asyncio.timeout(IO_TIMEOUT):
        writer.write(b"\x05\x01\x02")
        assert await reader.readexactly(2) == b"\x05\x02"
        name, secret = user.encode(), password.encode()
        writer.write(bytes([1, len(name)]) + name + bytes([len(secret)]) + secret)
        return await reader.readexactly(2)


async def socks5_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: int, host: str, port: int,
) -> tuple[int, tuple[str, int]]:
    """Send a request; returns (reply code, bound address)."""
    async with asyncio.timeout(IO_TIMEOUT):
        writer.write(bytes([5, command, 0]) + socks5_address(host, port))
        version, reply, _reserved = await reader.readexactly(3)
        assert version == 5
        return reply, await _read_socks5_address(reader)


async def socks5_connect(
    proxy: tuple[str, int], auth: tuple[str, str], host: str, port: int,
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await open_tcp(proxy)
    status = await socks5_login(reader, writer, *auth)
    assert status == b"\x01\x00", f"SOCKS5 authentication failed: {status!r}"
    reply, _bound = await socks5_request(reader, writer, 1, host, port)
    return reply, reader, writer


# --- SOCKS5 UDP ASSOCIATE ------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


@dataclass
class Socks5Udp:
    """A SOCKS5 UDP client (RFC 1928 §7): a control connection and a UDP socket."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    transport: asyncio.DatagramTransport
    protocol: _Datagrams
    relay: tuple[str, int]
    local: tuple[str, int]  # our UDP socket, named in the UDP ASSOCIATE request

    @classmethod
    async def open(cls, proxy: tuple[str, int], auth: tuple[str, str]) -> Socks5Udp:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
        try:
            reader, writer = await open_tcp(proxy)
            status = await socks5_login(reader, writer, *auth)
            assert status == b"\x01\x00", f"SOCKS5 authentication failed: {status!r}"
            local = transport.get_extra_info("sockname")[:2]
            reply, relay = await socks5_request(reader, writer, 3, *local)
            assert reply == 0, f"UDP ASSOCIATE failed with reply {reply:#04x}"
        except BaseException:
            transport.close()
            raise
        return cls(reader, writer, transport, protocol, relay, local)

    def send(self, host: str, port: int, payload: bytes, *, frag: int = 0) -> None:
        self.transport.sendto(build_udp_datagram(host, port, payload, frag=frag), self.relay)

    async def recv(self, within: float = IO_TIMEOUT) -> tuple[str, int, bytes]:
        """(source host, source port, payload) of the next datagram relayed to us."""
        async with asyncio.timeout(within):
            data = await self.protocol.queue.get()
        datagram = parse_udp_datagram(data)
        assert datagram.frag == 0
        return datagram.host, datagram.port, datagram.payload

    async def close(self) -> None:
        self.transport.close()
        await close_writer(self.writer)


@contextlib.asynccontextmanager
async def socks5_udp(proxy: tuple[str, int], auth: tuple[str, str]) -> AsyncIterator[Socks5Udp]:
    client = await Socks5Udp.open(proxy, auth)
    try:
        yield client
    finally:
        await client.close()


async def h3_get(
    udp: Socks5Udp, target: tuple[str, int], path: str, *, cafile: str, server_name: str,
    within: float = IO_TIMEOUT,
) -> tuple[int, bytes]:
    """GET over HTTP/3 with aioquic's sans-I/O connection, every datagram through `udp`."""
    loop = asyncio.get_running_loop()
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name)
    configuration.load_verify_locations(cafile=cafile)
    quic = QuicConnection(configuration=configuration)
    h3 = H3Connection(quic)
    host, port = target

    def flush() -> None:
        for data, _addr in quic.datagrams_to_send(now=loop.time()):
            udp.send(host, port, data)

    quic.connect(target, now=loop.time())
    stream_id = quic.get_next_available_stream_id()
    h3.send_headers(stream_id, [
        (b":method", b"GET"), (b":scheme", b"https"),
        (b":authority", f"{server_name}:{port}".encode()), (b":path", path.encode()),
        (b"user-agent", b"egressd-e2e"),
    ], end_stream=True)
    flush()
    status: int | None = None
    body = b""
    ended = False
    async with asyncio.timeout(within):
        while not ended:
            timer = quic.get_timer()
            wait = 1.0 if timer is None else max(0.0, timer - loop.time())
            try:
                source_host, source_port, payload = await udp.recv(within=wait)
            except TimeoutError:
                quic.handle_timer(now=loop.time())
            else:
                quic.receive_datagram(payload, (source_host, source_port), now=loop.time())
            while (event := quic.next_event()) is not None:
                if isinstance(event, ConnectionTerminated):
                    raise AssertionError(f"QUIC connection terminated: {event.reason_phrase!r}")
                for h3_event in h3.handle_event(event):
                    if isinstance(h3_event, HeadersReceived) and h3_event.stream_id == stream_id:
                        status = int(dict(h3_event.headers)[b":status"])
                        ended = ended or h3_event.stream_ended
                    elif isinstance(h3_event, DataReceived) and h3_event.stream_id == stream_id:
                        body += h3_event.data
                        ended = ended or h3_event.stream_ended
            flush()
    quic.close()
    flush()
    assert status is not None
    return status, body


# --- the flow log --------------------------------------------------------------------


def read_flows(path: str | Path) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def wait_flow(
    path: str | Path, match: Callable[[dict[str, Any]], bool], within: float = IO_TIMEOUT,
) -> dict[str, Any]:
    """The first flow-log line that `match`es, polling until it is written (a flow is
    logged when it ends, which may be a moment after the client saw its answer)."""
    deadline = time.monotonic() + within
    while True:
        found = [flow for flow in read_flows(path) if match(flow)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no flow-log line matched within {within} s in {read_flows(path)}")
        await asyncio.sleep(0.02)


def by_client_port(port: int) -> Callable[[dict[str, Any]], bool]:
    return lambda flow: str(flow.get("client", "")).endswith(f":{port}")


def by_source(source: str) -> Callable[[dict[str, Any]], bool]:
    return lambda flow: flow.get("source") == source


# --- settle loops and leak checks ----------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(condition: Callable[[], bool], within: float = 2.0) -> bool:
    """Poll `condition` until it holds or `within` seconds pass; returns its last value."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        await asyncio.sleep(0.02)
    return True


def describe_fds() -> list[str]:
    described = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            described.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(described)


def _control_plane_request(task: asyncio.Task[Any]) -> bool:
    """A request of `serve`'s in-process control plane (a PoP's long poll re-armed every
    25 s, a batch of flows): the control plane's, not a flow's."""
    return getattr(task.get_coro(), "__qualname__", "") == "RequestResponseCycle.run_asgi"


@contextlib.asynccontextmanager
async def no_leaks(settle_seconds: float = 2.0) -> AsyncIterator[None]:
    """Fails if the block leaves more open descriptors or more asyncio tasks than before."""
    fds_before = open_fds()
    tasks_before = set(asyncio.all_tasks())
    yield

    def extra_tasks() -> set[asyncio.Task[Any]]:
        return {task for task in asyncio.all_tasks() - tasks_before
                if not task.done() and not _control_plane_request(task)}

    clean = await settle(lambda: open_fds() <= fds_before and not extra_tasks(), settle_seconds)
    if not clean:
        fds = describe_fds()
        raise AssertionError(
            f"leak: {open_fds()} descriptors open (before: {fds_before}): {fds}; "
            f"extra tasks: {[task.get_coro() for task in extra_tasks()]}")


# --- test servers --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp_server(
    host: str, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> AsyncIterator[tuple[str, int]]:
    """A TCP server owned by the test: on exit its connections are reset and every
    handler task is awaited (cancelled only if it does not end by itself)."""
    connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections[task] = writer
        try:
            await handler(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the test is over, or the peer went away: nothing to report
        finally:
            writer.close()
            connections.pop(task, None)

    server = await asyncio.start_server(serve, host, 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for writer in connections.values():
            writer.transport.abort()
        tasks = list(connections)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=IO_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IO_TIMEOUT):
                await server.wait_closed()


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """Hold a port for a subprocess to bind: bound with SO_REUSEADDR/SO_REUSEPORT and never
    listening, so the child (which sets SO_REUSEADDR, or SO_REUSEPORT with workers) can bind
    it while no other program is handed the same ephemeral port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


async def udp_and_tcp_on_one_port(
        udp: Callable[[], asyncio.DatagramProtocol],
        tcp: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        host: str = "127.0.0.1") -> tuple[asyncio.DatagramTransport, asyncio.Server, int]:
    """A UDP endpoint and a TCP server on one port number, as a DNS server has. A free UDP
    port's number may be taken for TCP (another connection's local port): another is tried."""
    loop = asyncio.get_running_loop()
    for _attempt in range(50):
        transport, _ = await loop.create_datagram_endpoint(udp, local_addr=(host, 0))
        port = transport.get_extra_info("sockname")[1]
        try:
            server = await asyncio.start_server(tcp, host, port)
        except OSError:
            transport.close()
            continue
        return transport, server, port
    raise RuntimeError("no port free for both UDP and TCP")
