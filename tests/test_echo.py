"""The echo origin over real loopback sockets: HTTP/1.1, PROXY v2, UDP, HTTP/3, close()."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import typer
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from typer.testing import CliRunner

from egressd import pki
from egressd.cli.echo_cmd import register
from egressd.echo.server import ClientView, EchoServer, render_trace, respond, udp_reply
from egressd.protocols.geofeed import GeofeedEntry, GeofeedIndex
from egressd.protocols.proxy_v2 import encode_proxy_v2, encode_proxy_v2_local


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()
HOSTS = ["127.0.0.1", "::1"] if HAS_IPV6 else ["127.0.0.1"]
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no ::1 on this machine")

GEOFEED = GeofeedIndex(
    [
        GeofeedEntry(ip_network("127.0.0.0/8"), "US", "US-NV", "Las Vegas"),
        GeofeedEntry(ip_network("::1/128"), "US", "US-NY", "New York"),
        GeofeedEntry(ip_network("203.0.113.0/24"), "US", "US-CA", "Los Angeles"),
        GeofeedEntry(ip_network("2001:db8::/32"), "CH", "CH-ZH", "Zürich"),
    ]
)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[pki.CaFiles, pki.CertFiles]:
    directory = tmp_path_factory.mktemp("pki")
    ca = pki.ensure_ca(directory)
    return ca, pki.ensure_server_cert(directory, "echo", ["localhost"], ["127.0.0.1", "::1"], ca)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start(HOSTS, http_port=0, udp_port=0, geofeed=GEOFEED)
    try:
        yield server
    finally:
        await server.close()


# --- helpers ---------------------------------------------------------------------------------


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def curl(*args: str) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--noproxy", "*", "--max-time", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


def parse_trace(body: bytes | str) -> dict[str, str]:
    text = body.decode() if isinstance(body, bytes) else body
    return dict(line.split("=", 1) for line in text.splitlines())


async def exchange(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send raw bytes, return everything until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    pairs = (line.split(": ", 1) for line in header_lines)
    headers = {name.lower(): value for name, value in pairs}
    return int(status_line.split()[1]), headers, body


def get(path: str, *, close: bool = True) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return f"GET {path} HTTP/1.1\r\nHost: echo\r\n".encode() + connection + b"\r\n"


# --- pure answers -------------------------------------------------------------------------


def test_respond_and_trace_are_pure() -> None:
    client = ClientView("::ffff:203.0.113.9", 5, ("::ffff:127.0.0.1", 6), True, "1.1")
    assert respond("GET", "/?x=1", client, None).body == b"203.0.113.9\n"
    assert render_trace(client, GEOFEED) == (
        "ip=203.0.113.9\nfamily=4\nport=5\nproxy_protocol=yes\npeer=127.0.0.1\nhttp=1.1\n"
        "country=US\nregion=US-CA\ncity=Los Angeles\n"
    )
    plain = ClientView("2001:db9::1", 7, ("2001:db9::1", 7), False, "3")
    assert parse_trace(render_trace(plain, GEOFEED)) == {
        "ip": "2001:db9::1", "family": "6", "port": "7", "proxy_protocol": "no", "http": "3",
    }  # fmt: skip
    assert respond("GET", "/nope", plain, None).status == 404
    assert respond("DELETE", "/", plain, None).status == 405
    assert ("cache-control", "no-store") in respond("GET", "/", plain, None).headers


def test_udp_reply_is_pure() -> None:
    assert udp_reply(b"x", ("127.0.0.1", 9), True) == b"127.0.0.1 9\n"
    header = encode_proxy_v2(("203.0.113.1", 53), ("127.0.0.1", 9), transport="udp")
    assert udp_reply(header + b"q", ("127.0.0.1", 9), True) == b"203.0.113.1 53\n"
    assert udp_reply(header + b"q", ("127.0.0.1", 9), False) == b"127.0.0.1 9\n"
    assert udp_reply(header[:20], ("127.0.0.1", 9), True) is None
    assert udp_reply(header[:12] + b"\x31" + header[13:], ("127.0.0.1", 9), True) is None


# --- HTTP/1.1 over TCP ----------------------------------------------------------------------


async def test_get_root_with_curl(echo: EchoServer) -> None:
    for host in HOSTS:
        assert await curl(f"http://{url_host(host)}:{echo.http_port}/") == f"{host}\n"


async def test_trace_with_curl(echo: EchoServer) -> None:
    trace = parse_trace(await curl(f"http://127.0.0.1:{echo.http_port}/trace"))
    assert trace.pop("port").isdigit()
    assert trace == {
        "ip": "127.0.0.1", "family": "4", "proxy_protocol": "no", "http": "1.1",
        "country": "US", "region": "US-NV", "city": "Las Vegas",
    }  # fmt: skip


@needs_ipv6
async def test_trace_over_ipv6_with_curl(echo: EchoServer) -> None:
    trace = parse_trace(await curl(f"http://[::1]:{echo.http_port}/trace"))
    assert (trace["ip"], trace["family"], trace["city"]) == ("::1", "6", "New York")


async def test_keep_alive_serves_several_requests(echo: EchoServer) -> None:
    assert echo.http_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.http_port)
    local_port = writer.get_extra_info("sockname")[1]
    try:
        for path in ("/trace", "/", "/trace"):
            writer.write(get(path, close=False))
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers, _ = split_response(head)
            body = await reader.readexactly(int(headers["content-length"]))
            assert status == 200
            assert headers["content-type"] == "text/plain; charset=utf-8"
            if path == "/trace":
                assert parse_trace(body)["port"] == str(local_port)
            else:
                assert body == b"127.0.0.1\n"
    finally:
        writer.close()


async def test_proxy_v2_header_sets_the_client_address(echo: EchoServer) -> None:
    assert echo.http_port is not None
    header = encode_proxy_v2(("203.0.113.7", 40000), ("127.0.0.1", echo.http_port))
    status, _, body = split_response(await exchange(echo.http_port, header + get("/trace")))
    assert status == 200
    assert parse_trace(body) == {
        "ip": "203.0.113.7", "family": "4", "port": "40000", "proxy_protocol": "yes",
        "peer": "127.0.0.1", "http": "1.1",
        "country": "US", "region": "US-CA", "city": "Los Angeles",
    }  # fmt: skip
    _, _, body = split_response(await exchange(echo.http_port, header + get("/")))
    assert body == b"203.0.113.7\n"


async def test_proxy_v2_ipv6_source_and_tlvs(echo: EchoServer) -> None:
    assert echo.http_port is not None
    header = encode_proxy_v2(
        ("2001:db8::42", 1), ("2001:db8::1", 80), tlvs=[(0x02, b"echo")], checksum=True
    )
    _, _, body = split_response(await exchange(echo.http_port, header + get("/trace")))
    trace = parse_trace(body)
    assert (trace["ip"], trace["family"], trace["city"], trace["peer"]) == (
        "2001:db8::42", "6", "Zürich", "127.0.0.1",
    )  # fmt: skip


async def test_proxy_v2_header_arriving_byte_by_byte(echo: EchoServer) -> None:
    assert echo.http_port is not None
    data = encode_proxy_v2(("203.0.113.8", 1234), ("127.0.0.1", 80)) + get("/")
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.http_port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for index in range(30):  # the header and a little more, one segment each
            writer.write(data[index : index + 1])
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(data[30:])
        async with asyncio.timeout(10):
            _, _, body = split_response(await reader.read())
    finally:
        writer.close()
    assert body == b"203.0.113.8\n"


async def test_proxy_v2_local_uses_the_real_peer(echo: EchoServer) -> None:
    assert echo.http_port is not None
    data = encode_proxy_v2_local() + get("/trace")
    trace = parse_trace(split_response(await exchange(echo.http_port, data))[2])
    assert (trace["ip"], trace["proxy_protocol"], trace["peer"]) == (
        "127.0.0.1",
        "yes",
        "127.0.0.1",
    )


async def test_broken_proxy_header_closes_without_answer(echo: EchoServer) -> None:
    assert echo.http_port is not None
    header = bytearray(encode_proxy_v2(("203.0.113.7", 1), ("127.0.0.1", 2)))
    header[12] = 0x11  # version 1
    assert await exchange(echo.http_port, bytes(header) + get("/")) == b""
    # Still serving.
    assert await curl(f"http://127.0.0.1:{echo.http_port}/") == "127.0.0.1\n"


async def test_proxy_v2_can_be_refused() -> None:
    async with EchoServer(accept_proxy_v2=False) as server:
        await server.start("127.0.0.1", udp_port=None)
        assert server.http_port is not None
        header = encode_proxy_v2(("203.0.113.7", 1), ("127.0.0.1", 2))
        status, _, _ = split_response(await exchange(server.http_port, header + get("/")))
        assert status == 400


async def test_not_found_method_and_head(echo: EchoServer) -> None:
    assert echo.http_port is not None
    status, _, body = split_response(await exchange(echo.http_port, get("/admin")))
    assert (status, body) == (404, b"not found\n")
    request = b"POST / HTTP/1.1\r\nHost: e\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    status, headers, _ = split_response(await exchange(echo.http_port, request))
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    request = b"HEAD / HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n"
    status, headers, body = split_response(await exchange(echo.http_port, request))
    assert (status, headers["content-length"], body) == (200, "10", b"")


async def test_http_1_0_is_answered_and_closed(echo: EchoServer) -> None:
    assert echo.http_port is not None
    raw = await exchange(echo.http_port, b"GET /trace HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert parse_trace(split_response(raw)[2])["http"] == "1.0"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"\x00\x01\x02\x03\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: e\r\nX-Big: " + b"a" * 20000, 431),  # never ends
    ],
    ids=["not-http", "binary", "two-hosts", "bad-header", "huge-header"],
)
async def test_malformed_requests_get_an_error_and_close(
    echo: EchoServer, request_bytes: bytes, status: int
) -> None:
    assert echo.http_port is not None
    got, headers, _ = split_response(await exchange(echo.http_port, request_bytes))
    assert got == status
    assert headers["connection"] == "close"
    assert await curl(f"http://127.0.0.1:{echo.http_port}/") == "127.0.0.1\n"


async def test_oversized_body_is_refused(echo: EchoServer) -> None:
    assert echo.http_port is not None
    body = b"x" * (65 * 1024)
    request = b"GET / HTTP/1.1\r\nHost: e\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    status, _, _ = split_response(await exchange(echo.http_port, request))
    assert status == 413


async def test_idle_connections_are_closed() -> None:
    async with EchoServer(idle_timeout=0.2) as server:
        await server.start("127.0.0.1", udp_port=None)
        assert server.http_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()


# --- UDP ------------------------------------------------------------------------------------------


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.replies.put_nowait(data)


async def udp_ask(host: str, port: int, payload: bytes) -> tuple[bytes | None, int]:
    """Send one datagram; (reply or None after a short wait, our local port)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Collector, remote_addr=(host, port))
    try:
        transport.sendto(payload)
        try:
            async with asyncio.timeout(0.5 if payload.startswith(b"\r\n") else 5):
                reply: bytes | None = await protocol.replies.get()
        except TimeoutError:
            reply = None
        return reply, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def test_udp_echo(echo: EchoServer) -> None:
    assert echo.udp_port is not None
    for host in HOSTS:
        reply, local_port = await udp_ask(host, echo.udp_port, b"who am i")
        assert reply == f"{host} {local_port}\n".encode()


async def test_udp_echo_with_proxy_v2(echo: EchoServer) -> None:
    assert echo.udp_port is not None
    header = encode_proxy_v2(("203.0.113.5", 5353), ("127.0.0.1", 53), transport="udp")
    reply, _ = await udp_ask("127.0.0.1", echo.udp_port, header + b"payload")
    assert reply == b"203.0.113.5 5353\n"
    broken = header[:12] + b"\x31" + header[13:]
    assert (await udp_ask("127.0.0.1", echo.udp_port, broken))[0] is None


# --- HTTP/3 -----------------------------------------------------------------------------------------


class H3Client(QuicConnectionProtocol):
    """Just enough of an HTTP/3 client to GET a path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._responses: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
        self._waiters: dict[int, asyncio.Future[tuple[dict[bytes, bytes], bytes]]] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for http_event in self._http.handle_event(event):
            if isinstance(http_event, HeadersReceived):
                self._responses[http_event.stream_id] = (dict(http_event.headers), bytearray())
            elif isinstance(http_event, DataReceived):
                self._responses[http_event.stream_id][1].extend(http_event.data)
            else:
                continue
            if http_event.stream_ended:
                headers, body = self._responses.pop(http_event.stream_id)
                self._waiters.pop(http_event.stream_id).set_result((headers, bytes(body)))

    async def get(self, path: str) -> tuple[dict[bytes, bytes], bytes]:
        stream_id = self._quic.get_next_available_stream_id()
        request = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"),
                   (b":path", path.encode())]  # fmt: skip
        self._http.send_headers(stream_id, request, end_stream=True)
        waiter: asyncio.Future[tuple[dict[bytes, bytes], bytes]]
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[stream_id] = waiter
        self.transmit()
        async with asyncio.timeout(10):
            return await waiter


def client_configuration(ca: pki.CaFiles) -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    configuration.load_verify_locations(cafile=str(ca.cert_path))
    return configuration


async def test_http3_get_and_trace(certificates: tuple[pki.CaFiles, pki.CertFiles]) -> None:
    ca, cert = certificates
    async with EchoServer() as server:
        await server.start(
            HOSTS, http_port=None, udp_port=None, h3_port=0, geofeed=GEOFEED,
            certfile=cert.cert_path, keyfile=cert.key_path,
        )  # fmt: skip
        assert server.h3_port is not None
        assert len(server.h3_addresses) == len(HOSTS)
        for host in HOSTS:
            async with connect(
                host, server.h3_port, configuration=client_configuration(ca),
                create_protocol=H3Client,
            ) as client:  # fmt: skip
                assert isinstance(client, H3Client)
                headers, body = await client.get("/")
                assert headers[b":status"] == b"200"
                assert body == f"{host}\n".encode()
                headers, body = await client.get("/trace")
                trace = parse_trace(body)
                assert (trace["ip"], trace["http"], trace["proxy_protocol"]) == (host, "3", "no")
                assert "city" in trace
                headers, _ = await client.get("/missing")
                assert headers[b":status"] == b"404"


async def test_http3_needs_a_certificate() -> None:
    server = EchoServer()
    with pytest.raises(ValueError, match="certfile and keyfile"):
        await server.start("127.0.0.1", h3_port=0)
    await server.close()


# --- lifecycle ------------------------------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def fd_check() -> Iterator[None]:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    yield


async def test_close_leaves_no_tasks_and_no_sockets(
    fd_check: None, certificates: tuple[pki.CaFiles, pki.CertFiles]
) -> None:
    ca, cert = certificates
    tasks_before = asyncio.all_tasks()
    fds_before = open_fds()
    server = EchoServer()
    await server.start(
        HOSTS, udp_port=0, h3_port=0, geofeed=GEOFEED,
        certfile=cert.cert_path, keyfile=cert.key_path,
    )  # fmt: skip
    assert server.http_port is not None and server.h3_port is not None
    assert len(open_fds() - fds_before) >= 3 * len(HOSTS)
    # A keep-alive connection that is idle, one in the middle of a request, one H3.
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    idle_writer.write(get("/", close=False))
    await idle_reader.readuntil(b"127.0.0.1\n")
    half_reader, half_writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    half_writer.write(b"GET / HTTP/1.1\r\nHo")
    await half_writer.drain()
    async with connect(
        "127.0.0.1", server.h3_port, configuration=client_configuration(ca),
        create_protocol=H3Client,
    ) as client:  # fmt: skip
        assert isinstance(client, H3Client)
        await client.get("/")
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks() - tasks_before) >= 3  # supervisor + 2 connections
        await server.close()
        async with asyncio.timeout(5):
            await client.wait_closed()  # the server said CONNECTION_CLOSE
    async with asyncio.timeout(5):
        assert await idle_reader.read() == b""
        assert await half_reader.read() == b""
    idle_writer.close()
    half_writer.close()
    await idle_writer.wait_closed()
    await half_writer.wait_closed()
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - tasks_before == set()
    assert open_fds() - fds_before == set()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server.http_port)
    await server.close()  # idempotent


async def test_one_port_on_every_host(echo: EchoServer) -> None:
    assert [host for host, _ in echo.http_addresses] == HOSTS
    assert {port for _, port in echo.http_addresses} == {echo.http_port}
    assert {port for _, port in echo.udp_addresses} == {echo.udp_port}
    assert echo.h3_port is None and echo.h3_addresses == ()


async def test_failed_start_releases_everything(fd_check: None, echo: EchoServer) -> None:
    assert echo.http_port is not None
    tasks_before = asyncio.all_tasks()
    fds_before = open_fds()
    server = EchoServer()
    with pytest.raises(OSError):  # the HTTP port is free, the UDP one is taken
        await server.start("127.0.0.1", http_port=0, udp_port=echo.udp_port)
    assert asyncio.all_tasks() - tasks_before == set()
    assert open_fds() - fds_before == set()
    with pytest.raises(RuntimeError, match="once"):
        await server.start("127.0.0.1")


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_help() -> None:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        """Throwaway group so that `echo` is a subcommand."""

    result = CliRunner().invoke(app, ["echo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--host", "--http-port", "--udp-port", "--h3-port", "--geofeed", "--cert",
                   "--key", "--pki-dir", "--proxy-protocol"):  # fmt: skip
        assert option in result.output
    assert "PROXY protocol v2" in result.output


def test_cli_rejects_a_bad_geofeed(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        """Throwaway group."""

    feed = tmp_path / "feed.csv"
    feed.write_text("192.0.2.0/24,US,US-CA,Los Angeles\nbogus,US,,\n")
    result = CliRunner().invoke(app, ["echo", "--geofeed", str(feed)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "line 2" in result.output


async def test_report_link_names_the_interface_packets_arrived_on() -> None:
    """--report-link (the lab's proof of the egress PoP): link= in /trace over TCP and a third
    field in UDP replies, read from IP_PKTINFO/IPV6_PKTINFO. On loopback that is `lo`; without
    the option neither appears."""
    for report in (True, False):
        echo = EchoServer(report_link=report)
        await echo.start(HOSTS, http_port=0, udp_port=0)
        try:
            for host, port in echo.http_addresses:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /trace HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
                body = (await reader.read()).split(b"\r\n\r\n", 1)[1].decode()
                writer.close()
                assert ("link=lo" in body.splitlines()) is report, body
            loop = asyncio.get_running_loop()
            for host, port in echo.udp_addresses:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (host, port))
                    await loop.sock_sendall(sock, b"ping")
                    async with asyncio.timeout(5):
                        reply = (await loop.sock_recv(sock, 100)).decode().split()
                assert reply[0] == host and (reply[2:] == ["link=lo"]) is report, reply
        finally:
            await echo.close()
