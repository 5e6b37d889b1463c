"""The callback-driven absolute-form forwarding path (`pop/http_forward.py`), through the
real plain listener, with real sockets on 127.0.0.1: a small origin in the test, raw
clients, and the flow records the PoP writes. Every test runs on the standard event loop
and on uvloop (production).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from egressd.decide import HealthView
from egressd.model.deployment import load_deployment
from egressd.pop.admission import AdmissionLimits
from egressd.pop.flowlog import FlowLog
from egressd.pop.http_forward import ForwardProxyProtocol
from egressd.pop.listeners import Listener, ListenerSpec
from egressd.pop.metrics import PopMetrics
from egressd.pop.resolver import Resolver
from egressd.pop.runtime import NoBackbone, PopOptions, PopRuntime, StateHolder
from egressd.protocols.http1 import BodyTracker, RequestHeadReader, ResponseHead, ResponseHeadReader

TIMEOUT = 10.0
SECRET = "s3cret"
_DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()

# Two accounts egressing from the same shared address (127.0.0.2; the origin listens on
# 127.0.0.1): only the account and user in the key keep one's upstream connection away
# from the other's requests.
DEPLOYMENT = f"""
[deployment]
allow_destinations = ["127.0.0.1/32"]

[[data_centers]]
code = "tst"
city = "Loopback"
country = "ZZ"
latitude = 0.0
longitude = 0.0
shared_ipv4 = ["127.0.0.2"]

[[accounts]]
id = "alpha"
plan = "free"
  [[accounts.users]]
  name = "ann"
  [[accounts.devices]]
  id = "ann-laptop"
  user = "ann"
  secret_sha256 = "{_DIGEST}"

[[accounts]]
id = "beta"
plan = "free"
  [[accounts.users]]
  name = "bob"
  [[accounts.devices]]
  id = "bob-laptop"
  user = "bob"
  secret_sha256 = "{_DIGEST}"
"""
ANN = ("ann-laptop", SECRET)
BOB = ("bob-laptop", SECRET)


# --- the origin ------------------------------------------------------------------------

CHUNKED_BODY = (b"4\r\nWiki\r\n6;name=\"v\"\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n"
                b"0\r\nExpires: never\r\n\r\n")
BIG = bytes(range(256)) * 4096  # 1 MiB


@dataclass
class Seen:
    """One request as the origin received it: the upstream connection's port and raw body."""

    source: str
    port: int
    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Origin:
    address: tuple[str, int] = ("127.0.0.1", 0)
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed_ports: set[int] = field(default_factory=set)

    def url(self, path: str) -> str:
        return f"http://{self.address[0]}:{self.address[1]}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        source, port = writer.get_extra_info("peername")[:2]
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        heads = RequestHeadReader()
        try:
            while True:
                head = heads.next_head()
                while head is None:
                    data = await reader.read(65536)
                    if not data:
                        return
                    heads.feed(data)
                    head = heads.next_head()
                slow = head.path == "/sink"
                tracker, body, data = BodyTracker(head.body), bytearray(), heads.remainder()
                while True:
                    taken = tracker.feed(data)
                    body += data[:taken]
                    if tracker.done:
                        heads.feed(data[taken:])
                        break
                    if slow:
                        await asyncio.sleep(0.002)
                    data = await reader.read(16384 if slow else 65536)
                    if not data:
                        return
                self.seen.append(Seen(source, port, head.method, head.path,
                                      {k.lower(): v for k, v in head.headers}, bytes(body)))
                if not await self.answer(head.method, head.path, bytes(body), port, writer):
                    return
                if not head.keep_alive:
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed_ports.add(port)
            writer.close()

    async def answer(self, method: str, path: str, body: bytes, port: int,
                     writer: asyncio.StreamWriter) -> bool:
        """Write the response for `path`; False: the connection ends here."""
        def fixed(payload: bytes, status: str = "200 OK") -> bytes:
            head = f"HTTP/1.1 {status}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            return head if method == "HEAD" else head + payload

        if path == "/who":
            writer.write(fixed(str(port).encode()))
        elif path in ("/echo", "/sink"):
            writer.write(fixed(body if path == "/echo" else str(len(body)).encode()))
        elif path == "/chunked":  # written in pieces that cut lines and CRLFs
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY[:1])
            for start, end in ((1, 4), (4, 7), (7, 8), (8, 19), (19, 33), (33, 50), (50, None)):
                await writer.drain()
                await asyncio.sleep(0.005)
                writer.write(CHUNKED_BODY[start:end])
        elif path == "/big":
            writer.write(fixed(BIG))
        elif path == "/continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + fixed(b"ok"))
        elif path == "/204":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif path == "/304":
            writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")
        elif path == "/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
            await writer.drain()
            return False
        elif path == "/close-mid":  # promises 100 bytes, sends 50
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 50)
            await writer.drain()
            return False
        elif path == "/close-before":
            return False
        else:
            writer.write(fixed(b"no such path\n", "404 Not Found"))
        await writer.drain()
        return True


@contextlib.asynccontextmanager
async def serving_origin() -> AsyncIterator[Origin]:
    state = Origin()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        await state.serve(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.address = server.sockets[0].getsockname()[:2]
    try:
        yield state
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


# --- the PoP ---------------------------------------------------------------------------


@dataclass
class Pop:
    runtime: PopRuntime
    listener: Listener
    flows: io.StringIO

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.flows.getvalue().splitlines()]

    def connection(self) -> ForwardProxyProtocol:
        (only,) = self.listener.forward_connections
        return only


@contextlib.asynccontextmanager
async def running_pop(**options: Any) -> AsyncIterator[Pop]:
    flows = io.StringIO()
    snapshot = load_deployment(DEPLOYMENT)
    runtime = PopRuntime("tst", StateHolder(snapshot, HealthView(up=frozenset({"tst"}))), NoBackbone(),
                         Resolver(), PopOptions(**options), FlowLog(flows), PopMetrics())
    listener = Listener(runtime, ListenerSpec("127.0.0.1", 0))
    await listener.start()
    try:
        yield Pop(runtime, listener, flows)
    finally:
        await listener.close()
        runtime.relays.close_all()
        runtime.pipes.close()
        runtime.spares.clear()


Body = Callable[[Pop, Origin], Coroutine[Any, Any, None]]
Run = Callable[..., None]
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test body with an origin and a PoP (PopOptions from keywords) on the standard
    event loop and on uvloop, the production loop."""
    def runner(body: Body, **options: Any) -> None:
        async def main() -> None:
            async with serving_origin() as origin, running_pop(**options) as running:
                async with asyncio.timeout(60):
                    await body(running, origin)

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop_runner:
            loop_runner.run(main())

    return runner


# --- a raw client ----------------------------------------------------------------------


def request(method: str, url: str, auth: tuple[str, str] | None = ANN, *,
            headers: tuple[str, ...] = (), body: bytes = b"") -> bytes:
    authority = url.split("://", 1)[1].split("/", 1)[0]
    lines = [f"{method} {url} HTTP/1.1", f"Host: {authority}", *headers]
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Answer:
    head: ResponseHead
    body: bytes
    interim: list[int]

    @property
    def status(self) -> int:
        return self.head.status

    def header(self, name: str) -> bytes | None:
        wanted = name.lower().encode()
        return next((value for key, value in self.head.headers if key.lower() == wanted), None)


class Client:
    """A device speaking raw HTTP/1.1 to the PoP; responses are delimited by the same
    trackers the PoP uses, and the bytes after one response are kept for the next."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffered = b""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        if self.buffered:
            data, self.buffered = self.buffered, b""
            return data
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read(65536)

    async def answer(self, method: str = "GET") -> Answer:
        heads = ResponseHeadReader(method)
        interim: list[int] = []
        while True:
            head = heads.next_head()
            if head is None:
                data = await self.recv()
                if not data:
                    raise EOFError("the PoP closed the connection before a response head")
                heads.feed(data)
            elif head.is_interim:
                interim.append(head.status)
            else:
                break
        tracker, body, data = BodyTracker(head.body, error_status=502), bytearray(), heads.remainder()
        while True:
            taken = tracker.feed(data)
            body += data[:taken]
            if tracker.done:
                self.buffered = data[taken:]
                return Answer(head, bytes(body), interim)
            data = await self.recv()
            if not data:
                tracker.eof()  # until-close is fine; a cut body raises
                return Answer(head, bytes(body), interim)

    async def rest(self) -> bytes:
        """Everything until the PoP closes."""
        out = bytearray(self.buffered)
        self.buffered = b""
        while data := await self.recv():
            out += data
        return bytes(out)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def client(address: tuple[str, int], *, rcvbuf: int | None = None) -> AsyncIterator[Client]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    reader, writer = await asyncio.open_connection(sock=sock)
    device = Client(reader, writer)
    try:
        yield device
    finally:
        await device.close()


async def settle(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces) + b"0\r\n\r\n"


# --- keep-alive, reuse and the per-key rule --------------------------------------------


def test_keep_alive_requests_reuse_one_upstream_connection(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            ports = []
            for _ in range(3):
                await device.send(request("GET", origin.url("/who")))
                answer = await device.answer()
                assert answer.status == 200 and answer.header("Via") == b"1.1 egressd"
                ports.append(int(answer.body))
            assert len(pop.listener.forward_connections) == 1  # the transport owns the connection
        assert len(set(ports)) == 1 and origin.connections == 1
        records = pop.records()
        assert [record["outcome"] for record in records] == ["ok"] * 3
        assert {record["source"] for record in records} == {f"127.0.0.2:{ports[0]}"}
        assert {seen.source for seen in origin.seen} == {"127.0.0.2"}
        assert all(record["account"] == "alpha" and record["rule"] and record["bytes_down"] == len(str(ports[0]))
                   for record in records)
    run(body)


def test_other_credentials_never_reuse_the_upstream_connection(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        """Credentials may differ per request on one client connection: a request of another
        account gets its own upstream connection, and the first one is closed, not pooled."""
        async with client(pop.address) as device:
            ports = []
            for auth in (ANN, BOB, ANN):
                await device.send(request("GET", origin.url("/who"), auth))
                ports.append(int((await device.answer()).body))
            assert await settle(lambda: {ports[0], ports[1]} <= origin.closed_ports)
        assert ports[0] != ports[1] and ports[2] not in (ports[0], ports[1])
        assert origin.connections == 3
        assert [record["account"] for record in pop.records()] == ["alpha", "beta", "alpha"]
    run(body)


def test_wrong_credentials_get_407_and_the_connection_goes_on(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")))
            assert (await device.answer()).status == 200
            await device.send(request("GET", origin.url("/who"), ("ann-laptop", "wrong"))
                              + request("GET", origin.url("/who"), None)
                              + request("GET", origin.url("/who")))
            denied = [await device.answer(), await device.answer()]
            assert [answer.status for answer in denied] == [407, 407]
            assert denied[0].header("Proxy-Authenticate") == b'Basic realm="egressd"'
            assert denied[0].body == b"407 Proxy Authentication Required\n"
            assert (await device.answer()).status == 200
        outcomes = [(record["outcome"], record["error"]) for record in pop.records()]
        assert outcomes == [("ok", None), ("auth-failed", "wrong credentials for device 'ann-laptop'"),
                            ("auth-failed", "missing proxy credentials"), ("ok", None)]
    run(body)


# --- pipelining and framing ------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        batch = (request("GET", origin.url("/who"))
                 + request("POST", origin.url("/echo"), headers=("Content-Length: 5",), body=b"hello")
                 + request("HEAD", origin.url("/who"))
                 + request("POST", origin.url("/echo"), headers=("Transfer-Encoding: chunked",),
                           body=chunked([b"one", b"two"]))
                 + request("GET", origin.url("/204"))
                 + request("GET", origin.url("/304"))
                 + request("GET", origin.url("/who"), headers=("Connection: close",)))
        async with client(pop.address) as device:
            await device.send(batch)
            who = await device.answer()
            assert (await device.answer()).body == b"hello"
            head = await device.answer("HEAD")
            assert head.body == b"" and head.header("Content-Length") == who.header("Content-Length")
            assert (await device.answer()).body == chunked([b"one", b"two"])
            assert (await device.answer()).status == 204
            not_modified = await device.answer()
            assert not_modified.status == 304 and not_modified.body == b""
            last = await device.answer()
            assert last.body == who.body and last.header("Connection") == b"close"
            assert await device.rest() == b""  # and the PoP closed
        assert origin.connections == 1
        assert [seen.method for seen in origin.seen] == ["GET", "POST", "HEAD", "POST", "GET", "GET", "GET"]
        assert len(pop.records()) == 7
    run(body)


def test_chunked_request_body_split_at_odd_boundaries_arrives_verbatim(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        body = chunked([b"a" * 17, b"b" * 300, b"c"])[:-2] + b"X-Trailer: yes\r\n\r\n"
        async with client(pop.address) as device:
            await device.send(request("POST", origin.url("/echo"), headers=("Transfer-Encoding: chunked",)))
            for start, end in ((0, 1), (1, 3), (3, 4), (4, 22), (22, 23), (23, 30), (30, 331), (331, None)):
                await device.send(body[start:end])
                await asyncio.sleep(0.005)
            answer = await device.answer()
            assert answer.body == body
            await device.send(request("GET", origin.url("/who")))  # the body ended at the right byte
            assert (await device.answer()).status == 200
        assert origin.seen[0].body == body and origin.seen[0].headers[b"transfer-encoding"] == b"chunked"
        assert pop.records()[0]["bytes_up"] == len(body)
    run(body)


def test_chunked_response_split_at_odd_boundaries_arrives_verbatim(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/chunked")))
            answer = await device.answer()
            assert answer.body == CHUNKED_BODY and answer.header("Transfer-Encoding") == b"chunked"
            await device.send(request("GET", origin.url("/who")))
            assert (await device.answer()).status == 200
        assert origin.connections == 1
        assert pop.records()[0]["bytes_down"] == len(CHUNKED_BODY)
    run(body)


def test_interim_responses_are_forwarded_before_the_final_one(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("POST", origin.url("/continue"),
                                      headers=("Expect: 100-continue", "Content-Length: 2"), body=b"hi"))
            answer = await device.answer()
            assert answer.interim == [100] and answer.status == 200 and answer.body == b"ok"
    run(body)


def test_until_close_response_ends_the_client_connection(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/until-close")))
            answer = await device.answer()
            assert answer.body == b"until close" and answer.header("Connection") == b"close"
            assert await device.rest() == b""
        assert pop.records()[0]["outcome"] == "ok"
    run(body)


# --- backpressure ----------------------------------------------------------------------


def test_one_megabyte_response_to_a_slow_reader_is_held_back_upstream(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        """The origin writes 1 MiB at once; the device reads 16 KiB every 2 ms. The PoP stops
        reading the upstream while the device's write buffer is full, so it never holds more
        than a fraction of the body in user space."""
        async with client(pop.address, rcvbuf=16384) as device:
            await device.send(request("GET", origin.url("/who")))
            await device.answer()
            connection = pop.connection()
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            assert connection.transport is not None
            transport = connection.transport
            await device.send(request("GET", origin.url("/big")))
            received, most_buffered = bytearray(), 0
            while len(received) < len(BIG) + 38:
                most_buffered = max(most_buffered, transport.get_write_buffer_size())
                received += await device.reader.read(16384)
                await asyncio.sleep(0.002)
            device.buffered = bytes(received)
            answer = await device.answer()
        assert answer.body == BIG
        assert most_buffered < len(BIG) // 3, most_buffered
        assert pop.records()[1]["bytes_down"] == len(BIG)
    run(body)


def test_one_megabyte_upload_to_a_slow_origin_is_held_back_at_the_device(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        """The device writes 1 MiB at once; the origin reads 16 KiB every 2 ms. The PoP stops
        reading the device while the upstream's write buffer is full."""
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")))
            await device.answer()
            connection = pop.connection()
            upstream = connection.upstream
            assert upstream is not None and upstream.transport is not None
            upstream.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            device.writer.write(request("POST", origin.url("/sink"),
                                        headers=(f"Content-Length: {len(BIG)}",), body=BIG))
            most_buffered = 0
            answer_task = asyncio.ensure_future(device.answer())
            while not answer_task.done():
                most_buffered = max(most_buffered, upstream.transport.get_write_buffer_size())
                await asyncio.sleep(0.002)
            answer = await answer_task
        assert answer.body == str(len(BIG)).encode() and origin.seen[1].body == BIG
        assert most_buffered < len(BIG) // 3, most_buffered
        assert pop.records()[1]["bytes_up"] == len(BIG)
    run(body)


# --- upstream failures -----------------------------------------------------------------


def test_upstream_closing_before_responding_is_502(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/close-before")))
            answer = await device.answer()
            assert answer.status == 502
            assert answer.body == b"egressd: upstream closed the connection before responding\n"
            assert answer.header("Connection") == b"close"
            assert await device.rest() == b""
        (record,) = pop.records()
        assert record["outcome"] == "upstream-error"
        assert record["error"] == "upstream closed the connection before responding"
    run(body)


def test_upstream_closing_mid_body_cuts_the_response_and_is_logged(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        """After the head went out no 502 can follow: the device sees a cut body and a close."""
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/close-mid")))
            with pytest.raises(Exception, match="connection closed before the end"):
                await device.answer()
        (record,) = pop.records()
        assert record["outcome"] == "protocol-error" and record["bytes_down"] == 50
        assert record["error"] == "connection closed before the end of the message body"
    run(body)


def test_unreachable_upstream_is_502_with_the_reason(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there
        async with client(pop.address) as device:
            await device.send(request("GET", f"http://127.0.0.1:{port}/"))
            answer = await device.answer()
        assert answer.status == 502 and answer.body == f"egressd: 127.0.0.1:{port} refused the connection\n".encode()
        assert pop.records()[0]["outcome"] == "upstream-error"
    run(body)


def test_refused_destination_is_403_with_the_rule(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", "http://127.0.0.3:9/"))  # not in allow_destinations
            answer = await device.answer()
        assert answer.status == 403 and answer.header("X-Egressd-Rule")
        assert answer.body.startswith(b"egressd: flow refused (")
        assert pop.records()[0]["outcome"] == "refused"
    run(body)


# --- hand-back, timeouts, drain --------------------------------------------------------


def connect_request(authority: str, auth: tuple[str, str]) -> bytes:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    return (f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n").encode()


def test_local_request_and_connect_after_forwarded_ones_on_one_connection(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        """The transport hands the connection back for a request to the PoP itself and for a
        CONNECT; forwarding resumes on the transport after the local request, and the CONNECT
        becomes a splice relay exactly as a first request would."""
        authority = f"{origin.address[0]}:{origin.address[1]}"
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")))
            first = int((await device.answer()).body)
            await device.send(b"GET /health HTTP/1.1\r\nHost: pop\r\n\r\n")
            health = await device.answer()
            assert health.status == 200 and json.loads(health.body)["pop"] == "tst"
            await device.send(request("GET", origin.url("/who")))
            second = int((await device.answer()).body)
            assert len(pop.listener.forward_connections) == 1
            await device.send(connect_request(authority, ANN))
            assert (await device.answer("CONNECT")).status == 200
            assert len(pop.runtime.relays) == 1 and not pop.listener.forward_connections
            await device.send(b"GET /who HTTP/1.1\r\nHost: origin\r\n\r\n")
            tunnelled = int((await device.answer()).body)
        assert len({first, second, tunnelled}) == 3  # the kept upstream went with the hand-back
        assert await settle(lambda: len(pop.runtime.relays) == 0)
        assert [record["outcome"] for record in pop.records()] == ["ok", "ok", "ok"]
    run(body)


def test_pipelined_connect_after_a_forwarded_request_keeps_its_early_data(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        authority = f"{origin.address[0]}:{origin.address[1]}"
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")) + connect_request(authority, ANN)
                              + b"GET /who HTTP/1.1\r\nHost: origin\r\n\r\n")
            assert (await device.answer()).status == 200
            assert (await device.answer("CONNECT")).status == 200
            assert (await device.answer()).status == 200
    run(body)


def test_idle_keep_alive_connection_is_closed_quietly_after_the_idle_timeout(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")))
            await device.answer()
            started = asyncio.get_running_loop().time()
            assert await device.rest() == b""
            assert 0.25 <= asyncio.get_running_loop().time() - started < 3.0
        assert await settle(lambda: not pop.listener.forward_connections and not pop.listener.tasks)
        assert [record["outcome"] for record in pop.records()] == ["ok"]
    run(body, idle_timeout=0.3, handshake_timeout=5.0)


def test_idle_connection_after_a_407_is_closed_after_the_idle_timeout(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who"), None))
            assert (await device.answer()).status == 407
            started = asyncio.get_running_loop().time()
            assert await device.rest() == b""
            assert 0.25 <= asyncio.get_running_loop().time() - started < 3.0
    run(body, idle_timeout=0.3, handshake_timeout=5.0)


def test_next_request_head_started_but_not_finished_is_408(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")))
            await device.answer()
            await asyncio.sleep(0.5)  # idle: the handshake timeout does not run between requests
            await device.send(b"GET http://127.0.0.1/ HTTP/1.1\r\nHo")
            started = asyncio.get_running_loop().time()
            answer = await device.answer()
            assert answer.status == 408 and answer.body == b"request header timeout\n"
            assert 0.25 <= asyncio.get_running_loop().time() - started < 3.0
            assert await device.rest() == b""
    run(body, idle_timeout=30.0, handshake_timeout=0.3)


def test_upstream_that_never_answers_is_504_after_the_idle_timeout(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        try:
            async with client(pop.address) as device:
                await device.send(request("GET", f"http://127.0.0.1:{port}/"))
                answer = await device.answer()
                assert answer.status == 504 and b"sent no response within 0.2 s" in answer.body
                assert pop.records()[0]["outcome"] == "upstream-error"
        finally:
            silent.close()
            await silent.wait_closed()
    run(body, idle_timeout=0.2)


def test_bad_second_request_is_400_and_closes(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")))
            await device.answer()
            await device.send(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            answer = await device.answer()
            assert answer.status == 400 and b"more than one Host header" in answer.body
            assert await device.rest() == b""
    run(body)


def test_client_half_close_after_a_request_still_gets_the_answer(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("GET", origin.url("/who")) + request("GET", origin.url("/who")))
            device.writer.write_eof()
            assert (await device.answer()).status == 200
            assert (await device.answer()).status == 200
            assert await device.rest() == b""
    run(body)


def test_incomplete_request_body_then_close_is_400(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            await device.send(request("POST", origin.url("/echo"), headers=("Content-Length: 10",), body=b"abc"))
            device.writer.write_eof()
            answer = await device.answer()
            assert answer.status == 400
            assert await device.rest() == b""
        assert pop.records()[0]["outcome"] == "protocol-error"
    run(body)


def test_drain_closes_idle_connections_and_ends_busy_ones_after_their_answer(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as idle, client(pop.address) as busy:
            await idle.send(request("GET", origin.url("/who")))
            await idle.answer()
            await busy.send(request("POST", origin.url("/echo"), headers=("Content-Length: 4",), body=b"ab"))
            assert await settle(lambda: len(pop.listener.forward_connections) == 2)
            pop.runtime.draining = True
            pop.listener.stop_accepting()
            assert await idle.rest() == b""
            await busy.send(b"cd")
            answer = await busy.answer()
            assert answer.body == b"abcd" and answer.header("Connection") == b"close"
            assert await busy.rest() == b""
        assert await settle(lambda: not pop.listener.tasks)
    run(body)


# --- known heads: a repeated request or response goes without a reader -------------------


@pytest.fixture()
def counted_readers(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Fresh known-head memos, and counts of the heads the PoP's readers read (not the test
    client's or the origin's)."""
    from egressd.pop import http_forward
    from egressd.protocols.memo import WholeHeads

    monkeypatch.setattr(http_forward, "_WHOLE_REQUESTS", WholeHeads())
    monkeypatch.setattr(http_forward, "_WHOLE_RESPONSES", WholeHeads())
    counts = {"requests": 0, "responses": 0}

    class Requests(RequestHeadReader):
        def next_head(self) -> Any:
            head = super().next_head()
            counts["requests"] += head is not None
            return head

    class Responses(ResponseHeadReader):
        def next_head(self) -> Any:
            head = super().next_head()
            counts["responses"] += head is not None
            return head

    def head_reader(options: PopOptions) -> RequestHeadReader:
        return Requests(max_request_line=options.max_request_line,
                        max_header_section=options.max_header_section,
                        max_fields=options.max_header_fields)

    monkeypatch.setattr(PopOptions, "head_reader", head_reader)
    monkeypatch.setattr(http_forward, "ResponseHeadReader", Responses)
    return counts


def test_repeated_requests_and_responses_are_forwarded_without_readers(
        run: Run, counted_readers: dict[str, int]) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            answers = []
            for _ in range(5):
                await device.send(request("GET", origin.url("/who")))
                answers.append(await device.answer())
        # The first head is read by the handshake, the second by the connection's reader;
        # the same bytes after that are known. The first response is read, then known.
        assert counted_readers == {"requests": 2, "responses": 1}
        assert len({answer.body for answer in answers}) == 1  # one kept upstream
        for answer in answers:  # the known path forwards what the read one does
            assert answer.status == 200 and answer.header("Via") == b"1.1 egressd"
            assert answer.header("Content-Length") == str(len(answer.body)).encode()
        assert len(origin.seen) == 5 and all(seen.headers[b"via"] == b"1.1 egressd" for seen in origin.seen)
        records = pop.records()
        assert [record["outcome"] for record in records] == ["ok"] * 5
        assert len({record["flow_id"] for record in records}) == 5
        assert {record["bytes_down"] for record in records} == {len(answers[0].body)}
        # From the third on, the same bytes start the same exchange: each record still
        # says who, where to and from which address, as the first one does.
        what = [{key: record[key] for key in ("account", "device", "destination", "port", "egress",
                                              "source", "rule", "client")} for record in records]
        assert all(fields == what[0] for fields in what) and what[0]["egress"] and what[0]["source"]
    run(body)


def test_a_known_head_is_still_authenticated_and_framed_per_method(
        run: Run, counted_readers: dict[str, int]) -> None:
    """Known bytes skip the reader, not the checks: wrong credentials get 407 every time, a
    HEAD's answer has no body though its head says Content-Length, and a known response
    head whose body is not all in the read goes through the reader."""
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            for _ in range(3):
                await device.send(request("GET", origin.url("/who"), ("ann-laptop", "wrong")))
                denied = await device.answer()
                assert denied.status == 407 and denied.body == b"407 Proxy Authentication Required\n"
            for method in ("GET", "HEAD", "GET", "HEAD", "GET"):
                await device.send(request(method, origin.url("/who")))
                answer = await device.answer(method)
                assert answer.status == 200 and (answer.body == b"" if method == "HEAD" else answer.body.isdigit())
            for _ in range(3):  # 1 MiB: the head comes with only part of the body
                await device.send(request("GET", origin.url("/big")))
                assert (await device.answer()).body == BIG
        outcomes = [record["outcome"] for record in pop.records()]
        assert outcomes == ["auth-failed"] * 3 + ["ok"] * 8
        assert counted_readers["responses"] >= 4  # the /big heads, and HEAD after GET
    run(body)


def test_the_same_request_again_is_refused_once_a_new_snapshot_revokes_the_device(
        run: Run, counted_readers: dict[str, int]) -> None:
    """A connection remembers its last request's identity only for the snapshot it was
    checked under: the same bytes after the device is revoked get 407, the other account's
    device goes on."""
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            for _ in range(3):  # read, then known, then this connection's last request
                await device.send(request("GET", origin.url("/who")))
                assert (await device.answer()).status == 200
            revoked = load_deployment(DEPLOYMENT.replace(f'id = "ann-laptop"\n  user = "ann"\n  secret_sha256 = "{_DIGEST}"',
                                                         'id = "ann-laptop"\n  user = "ann"\n  secret_sha256 = "' + "0" * 64 + '"'))
            pop.runtime.state.replace(revoked)
            await device.send(request("GET", origin.url("/who")))
            assert (await device.answer()).status == 407
        async with client(pop.address) as other:
            await other.send(request("GET", origin.url("/who"), BOB))
            assert (await other.answer()).status == 200
        outcomes = [record["outcome"] for record in pop.records()]
        assert outcomes == ["ok"] * 3 + ["auth-failed", "ok"]
    run(body)


def test_a_connection_rewrites_each_head_for_what_it_is_sent_with(
        run: Run, counted_readers: dict[str, int]) -> None:
    """A connection keeps its last rewritten request and response heads: alternating
    requests each go up as themselves, and the same response head goes back with
    `Connection: close` once the request asks for it."""
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            tries = ["1", "2", "2", "1", "2"]
            for number in tries:
                await device.send(request("GET", origin.url("/who"), headers=(f"X-Try: {number}",)))
                answer = await device.answer()
                assert answer.status == 200 and answer.header("Connection") is None
            await device.send(request("GET", origin.url("/who"), headers=("X-Try: 1", "Connection: close")))
            last = await device.answer()
            assert last.status == 200 and last.header("Connection") == b"close"
            assert await device.rest() == b""
        assert [seen.headers[b"x-try"] for seen in origin.seen] == [n.encode() for n in [*tries, "1"]]
        assert all(seen.headers[b"via"] == b"1.1 egressd" for seen in origin.seen)
        assert counted_readers["responses"] == 1  # every response after the first was known
    run(body)


def test_a_source_past_its_failure_limit_is_refused_on_a_connection_that_was_forwarding(
        run: Run, counted_readers: dict[str, int]) -> None:
    """A connection that authenticated a request does not skip the throttle: once its
    source reaches the failure limit (here on another connection), the same known request
    gets 407 without a credential check, until the window ends."""
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device, client(pop.address) as guesser:
            for _ in range(3):  # read, then known, then the connection's last identity
                await device.send(request("GET", origin.url("/who")))
                assert (await device.answer()).status == 200
            for _ in range(3):
                await guesser.send(request("GET", origin.url("/who"), ("ann-laptop", "guess")))
                assert (await guesser.answer()).status == 407
            await device.send(request("GET", origin.url("/who")))
            assert (await device.answer()).status == 407
        outcomes = [record["outcome"] for record in pop.records()]
        assert outcomes == ["ok"] * 3 + ["auth-failed"] * 4
        assert pop.runtime.metrics.registry.get_sample_value(
            "egressd_admission_refused_total", {"pop": "tst", "reason": "auth-rate"}) == 1
    run(body, limits=AdmissionLimits(auth_failures_per_source=3))


def test_a_repeated_request_after_its_upstream_went_away_opens_a_new_one(
        run: Run, counted_readers: dict[str, int]) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            ports = []
            for _ in range(3):  # read, known, then the same bytes again
                await device.send(request("GET", origin.url("/who")))
                ports.append((await device.answer()).body)
            kept = pop.connection().upstream
            assert kept is not None and kept.transport is not None
            kept.transport.close()  # as if the origin had closed it while idle
            assert await settle(lambda: pop.connection().upstream is None)
            for _ in range(2):
                await device.send(request("GET", origin.url("/who")))
                ports.append((await device.answer()).body)
        assert len(set(ports[:3])) == 1 and len(set(ports[3:])) == 1 and ports[3] != ports[0]
        assert origin.connections == 2
        assert [record["outcome"] for record in pop.records()] == ["ok"] * 5
    run(body)


def test_a_repeated_exchange_goes_with_the_via_name_in_force(
        run: Run, counted_readers: dict[str, int]) -> None:
    """The same request and response bytes again are rewritten anew once `via` changes."""
    async def body(pop: Pop, origin: Origin) -> None:
        async with client(pop.address) as device:
            for via in ("egressd", "egressd", "egressd", "edge", "edge"):
                pop.runtime.options = dataclasses.replace(pop.runtime.options, via=via)
                await device.send(request("GET", origin.url("/who")))
                answer = await device.answer()
                assert answer.status == 200 and answer.header("Via") == f"1.1 {via}".encode()
        assert [seen.headers[b"via"] for seen in origin.seen] == [b"1.1 egressd"] * 3 + [b"1.1 edge"] * 2
    run(body)


def _counted(pop: Pop, metric: str, **labels: str) -> float:
    """The sum of a counter's samples with these labels (the PoP's batch handed over first)."""
    pop.runtime.flow_metrics.flush()
    return sum(sample.value for family in pop.runtime.metrics.registry.collect()
               for sample in family.samples
               if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_with_no_flow_log_each_repeated_request_is_still_counted_once(
        run: Run, counted_readers: dict[str, int]) -> None:
    """With no flow log and no sink, a repeated exchange reuses the connection's last record
    instead of making one: every request is still counted, with its own bytes and outcome."""
    async def body(pop: Pop, origin: Origin) -> None:
        pop.runtime.flowlog.enabled = False
        async with client(pop.address) as device:
            sizes = []
            for _ in range(6):
                await device.send(request("GET", origin.url("/who")))
                sizes.append(len((await device.answer()).body))
            await device.send(request("GET", origin.url("/nowhere")))  # a 404 on the same upstream
            missing = await device.answer()
        assert missing.status == 404 and pop.records() == []
        assert _counted(pop, "egressd_flows_total", outcome="ok") == 7
        assert _counted(pop, "egressd_bytes_total", direction="down") == sum(sizes) + len(missing.body)
        assert _counted(pop, "egressd_bytes_total", direction="up") == 0
    run(body)
