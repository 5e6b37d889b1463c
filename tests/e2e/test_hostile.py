"""Hostile clients against a real PoP, table-driven (issue 9): every malformed HTTP/1.1
request and SOCKS5 dialogue gets its exact answer (an HTTP status; SOCKS5 reply bytes, or a
close with no reply), the connection is closed, and nothing reaches the origin.

One `ServeStack` (three PoPs, control plane) serves the whole module; the clients talk to
the las PoP. The origin is a counting TCP server on an allowed loopback address
(127.0.9.2): each case compares its connection and byte counts before and after. The
requests carry valid credentials and name that origin, so a parser that let one through
would forward it there (and the case would see the origin's 200 instead of its error). A
second counting server on 127.0.0.1, outside `allow_destinations`, is the SSRF target.

Each HTTP case runs on three paths through the PoP: the first request of a plain
connection (the callback handshake), a request after a forwarded one on the same
connection (the forwarding transport), and the TLS listener (the coroutine path). Every
read is bounded: a PoP that waits for more bytes fails the case on the bound, well before
the handshake timeout would answer 408. Each connection comes from its own loopback source
address, so per-source limits (authentication failures, handshakes) never mix cases.

Cases with a valid head and a bad chunked body (`head_forwarded`) are the one exception to
"nothing at the origin": the head is forwarded before the body arrives, so the origin may
see that head, and then a close. What the cases check there is that no byte of the body
(the smuggled request after the bad chunk line) ever reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import itertools
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from egressd.serve import ServeSettings, ServeStack

from .helpers import (
    IO_TIMEOUT,
    close_writer,
    credentials,
    describe_fds,
    open_fds,
    pop_plain,
    pop_tls,
    read_all,
    read_response,
    settle,
    tcp_server,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORIGIN_HOST = "127.0.9.2"  # inside serve's allow_destinations (127.0.9.0/24)
REFUSED_HOST = "127.0.0.1"  # outside it: the PoP must never connect there (R13)
ANSWER_WITHIN = 5.0  # every answer comes at once; the handshake timeout (10 s) is far off
MARKER = b"SMUGGLED"  # in every body that must never reach the origin


# --- the stack -----------------------------------------------------------------------


class CountingOrigin:
    """Counts connections and keeps every byte received; answers each request head with a
    small keep-alive 200 (so that the controls, and a parser that wrongly let a request
    through, get an answer)."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = bytearray()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pending = b""
        while data := await reader.read(65536):
            self.received += data
            pending += data
            while b"\r\n\r\n" in pending:
                _head, pending = pending.split(b"\r\n\r\n", 1)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def mark(self) -> tuple[int, int]:
        return self.connections, len(self.received)

    def since(self, mark: tuple[int, int]) -> tuple[int, bytes]:
        """(new connections, new bytes) since `mark`."""
        return self.connections - mark[0], bytes(self.received[mark[1]:])


@dataclass
class Stack:
    info: dict[str, Any]
    origin: CountingOrigin
    origin_address: tuple[str, int]
    refused: CountingOrigin
    refused_address: tuple[str, int]
    tls: ssl.SSLContext
    fds: int = 0
    tasks: int = 0

    @property
    def user(self) -> tuple[str, str]:
        return credentials(self.info, "globex")  # free account: leaves from las directly

    def fill(self, template: bytes) -> bytes:
        """The request with the stack's origin, SSRF target and credentials filled in."""
        user, password = self.user
        auth = base64.b64encode(f"{user}:{password}".encode())
        origin = "{}:{}".format(*self.origin_address).encode()
        refused = "{}:{}".format(*self.refused_address).encode()
        return (template.replace(b"{AUTH}", b"Proxy-Authorization: Basic " + auth)
                .replace(b"{O}", origin).replace(b"{OH}", ORIGIN_HOST.encode())
                .replace(b"{OPW}", str(self.origin_address[1] + 65536).encode())
                .replace(b"{OP}", str(self.origin_address[1]).encode())
                .replace(b"{R}", refused).replace(b"{RP}", str(self.refused_address[1]).encode()))

    def login(self) -> bytes:
        user, password = (part.encode() for part in self.user)
        return b"\x05\x01\x02" + bytes([1, len(user)]) + user + bytes([len(password)]) + password


_sources = itertools.cycle(f"127.0.{third}.{fourth}" for third in range(4, 9) for fourth in range(1, 255))


async def connect(address: tuple[str, int], tls: ssl.SSLContext | None = None,
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from a loopback source address of its own."""
    async with asyncio.timeout(IO_TIMEOUT):
        return await asyncio.open_connection(
            *address, local_addr=(next(_sources), 0), ssl=tls,
            server_hostname="localhost" if tls is not None else None)


async def send(writer: asyncio.StreamWriter, data: bytes, *, half_close: bool) -> None:
    """Send; a PoP that answers and closes before taking everything is fine (and expected
    for the size limits), so a reset while sending is not an error."""
    with contextlib.suppress(ConnectionError):
        writer.write(data)
        async with asyncio.timeout(IO_TIMEOUT):
            await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()


async def answer_until_close(reader: asyncio.StreamReader) -> bytes:
    try:
        return await read_all(reader, within=ANSWER_WITHIN)
    except TimeoutError:
        raise AssertionError(f"the PoP neither answered nor closed within {ANSWER_WITHIN} s") from None
    except ssl.SSLError:  # a TLS peer that closes without close_notify: the answer was read
        return b""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    state = tmp_path_factory.mktemp("hostile") / "state"
    origin, refused = CountingOrigin(), CountingOrigin()
    async with contextlib.AsyncExitStack() as exits:
        origin_address = await exits.enter_async_context(tcp_server(ORIGIN_HOST, origin.handle))
        refused_address = await exits.enter_async_context(tcp_server(REFUSED_HOST, refused.handle))
        serve = ServeStack(ServeSettings(state_dir=Path(state), port_base=0))
        info = await serve.start()
        exits.push_async_callback(serve.close)
        tls = ssl.create_default_context(cafile=info["ca_cert"])
        built = Stack(info, origin, origin_address, refused, refused_address, tls)
        await _controls(built)
        await asyncio.sleep(0.5)  # the flow shipper's first batches: its connections come and go
        built.fds, built.tasks = open_fds(), len(asyncio.all_tasks())
        yield built


async def _controls(stack: Stack) -> None:
    """The origin is reachable, and counts, through every path the cases use."""
    for tls in (None, stack.tls):
        mark = stack.origin.mark()
        listener = pop_tls(stack.info) if tls else pop_plain(stack.info)
        reader, writer = await connect(listener, tls)
        try:
            await send(writer, stack.fill(GOOD_GET), half_close=False)
            assert (await read_response(reader)).status == 200
        finally:
            await close_writer(writer)
        new_connections, new_bytes = stack.origin.since(mark)
        assert new_connections == 1 and new_bytes.startswith(b"GET /good HTTP/1.1\r\n")
    mark = stack.origin.mark()
    reader, writer = await connect(pop_plain(stack.info))
    try:
        request = socks_request(1, ipv4(ORIGIN_HOST), stack.origin_address[1])
        await send(writer, stack.login() + request + b"GET /socks HTTP/1.1\r\n\r\n", half_close=False)
        async with asyncio.timeout(IO_TIMEOUT):
            assert await reader.readexactly(7) == b"\x05\x02\x01\x00\x05\x00\x00"
            bound_type = await reader.readexactly(1)
            await reader.readexactly(6 if bound_type == b"\x01" else 18)
        assert (await read_response(reader)).status == 200
    finally:
        await close_writer(writer)
    assert stack.origin.since(mark) == (1, b"GET /socks HTTP/1.1\r\n\r\n")


# --- HTTP cases ----------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    id: str
    data: bytes  # a template for Stack.fill
    status: int
    half_close: bool = False  # end our side after the data (truncations)
    head_forwarded: bool = False  # a valid head with a bad body: see the module docstring


GOOD_GET = b"GET http://{O}/good HTTP/1.1\r\nHost: {O}\r\n{AUTH}\r\n\r\n"


def req(*fields: str, start: str = "GET http://{O}/ HTTP/1.1", body: bytes = b"",
        host: bool = True, auth: bool = True) -> bytes:
    """A request head (latin-1, so control bytes and obs-text can be written as text)."""
    lines = [start, *(["Host: {O}"] if host else []), *(["{AUTH}"] if auth else []), *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def post(*fields: str, body: bytes = b"") -> bytes:
    return req(*fields, start="POST http://{O}/submit HTTP/1.1", body=body)


def connect_to(target: str, *fields: str) -> bytes:
    return req(*fields, start=f"CONNECT {target} HTTP/1.1", host=False)


SMUGGLED = b"GET /" + MARKER + b" HTTP/1.1\r\nHost: {O}\r\n\r\n"


def chunked(first_line: bytes) -> bytes:
    """A chunked POST whose body starts with `first_line`, then a smuggled request."""
    return post("Transfer-Encoding: chunked", body=first_line + SMUGGLED)


def h(case_id: str, data: bytes, status: int = 400, **flags: bool) -> HttpCase:
    return HttpCase(case_id, data, status, **flags)


def body_case(case_id: str, first_line: bytes) -> HttpCase:
    return HttpCase(case_id, chunked(first_line), 400, head_forwarded=True)


CONNECT_TARGETS = {
    "no-port": "{OH}", "empty-port": "{OH}:", "only-port": ":{OP}", "port-0": "{OH}:0",
    "port-00": "{OH}:00", "leading-zero": "{OH}:0{OP}", "plus-sign": "{OH}:+{OP}",
    "minus-sign": "{OH}:-{OP}", "port-65536": "{OH}:65536", "port-99999": "{OH}:99999",
    "port-2^32": "{OH}:4294967296", "port-wraps-to-origin": "{OH}:{OPW}", "path": "{O}/x", "two-ports": "{O}:1",
    "trailing-dot-port": "{O}.", "ipv6-no-port": "[::1]", "ipv6-no-colon": "[::1]443",
    "ipv6-junk": "[::1]:443x", "ipv6-unbracketed": "::1:443", "ipv6-zone": "[fe80::1%eth0]:443",
    "ipvfuture": "[v1.x]:443", "bracketed-ipv4": "[{OH}]:{OP}", "scheme": "http://{O}",
    "userinfo": "user@{O}", "userinfo-password": "user:pw@{O}", "hex-ipv4": "0x7f.0.9.2:{OP}",
    "integer-ipv4": "2130708738:{OP}", "short-ipv4": "127.2:{OP}", "octal-ipv4": "0177.0.9.2:{OP}",
    "percent-host": "127%2e0.9.2:{OP}", "empty-label": "a..b:{OP}",
}

HTTP_CASES = [
    # Framing: Content-Length and Transfer-Encoding (request smuggling).
    h("cl-and-te", post("Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n")),
    h("te-and-cl", post("Transfer-Encoding: chunked", "Content-Length: 5", body=b"0\r\n\r\n")),
    h("cl-two-lines-differ", post("Content-Length: 1", "Content-Length: 2", body=b"ab")),
    h("cl-list-differs", post("Content-Length: 1, 2", body=b"ab")),
    h("cl-plus", post("Content-Length: +2", body=b"ab")),
    h("cl-minus", post("Content-Length: -1")),
    h("cl-hex", post("Content-Length: 0x2", body=b"ab")),
    h("cl-empty", post("Content-Length: ")),
    h("cl-trailing-letter", post("Content-Length: 2a", body=b"ab")),
    h("cl-inner-space", post("Content-Length: 1 2")),
    h("cl-19-digits", post("Content-Length: " + "9" * 19)),
    h("cl-empty-element", post("Content-Length: ,2", body=b"ab")),
    h("cl-superscript-digit", post("Content-Length: \xb2", body=b"ab")),
    h("te-gzip-not-chunked", post("Transfer-Encoding: gzip", body=MARKER)),
    h("te-chunked-then-gzip", post("Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n")),
    h("te-chunked-twice", post("Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n")),
    h("te-on-two-lines", post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked")),
    h("te-parameter", post("Transfer-Encoding: chunked;q=1", body=b"0\r\n\r\n")),
    h("te-empty-element", post("Transfer-Encoding: chunked,", body=b"0\r\n\r\n")),
    h("te-empty", post("Transfer-Encoding: ", body=b"0\r\n\r\n")),
    h("te-vertical-tab", post("Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n")),
    h("te-obs-text", post("Transfer-Encoding: chunked\xa0", body=b"0\r\n\r\n")),
    h("te-identity", post("Transfer-Encoding: identity", body=MARKER), 501),
    h("te-unknown", post("Transfer-Encoding: zstd, chunked", body=b"0\r\n\r\n"), 501),
    h("te-in-http-1.0", req("Transfer-Encoding: chunked", start="POST http://{O}/ HTTP/1.0",
                            body=b"0\r\n\r\n")),
    h("connection-names-cl", post("Connection: content-length", "Content-Length: 2", body=b"ab")),
    h("connection-names-te", post("Connection: transfer-encoding", "Transfer-Encoding: chunked")),
    h("connection-names-host", req("Connection: Host")),
    h("content_length-lookalike", post("Content_Length: 2", body=b"ab")),
    h("transfer_encoding-lookalike", post("Transfer_Encoding: chunked", body=b"0\r\n\r\n")),
    h("connect-with-body", connect_to("{O}", "Content-Length: 2") + b"ab"),
    h("connect-chunked", connect_to("{O}", "Transfer-Encoding: chunked") + b"0\r\n\r\n"),
    # Chunked bodies: the size line is checked before any byte of the body goes on.
    body_case("chunk-size-0x", b"0x5\r\n"),
    body_case("chunk-size-negative", b"-5\r\n"),
    body_case("chunk-size-plus", b"+5\r\n"),
    body_case("chunk-size-leading-space", b" 5\r\n"),
    body_case("chunk-size-trailing-space", b"5 \r\n"),
    body_case("chunk-size-17-digits", b"1" * 17 + b"\r\n"),
    body_case("chunk-size-2^63", b"8000000000000000\r\n"),
    body_case("chunk-size-2^64-1", b"ffffffffffffffff\r\n"),
    body_case("chunk-size-not-hex", b"g\r\n"),
    body_case("chunk-size-empty", b"\r\n"),
    body_case("chunk-size-bare-lf", b"5\nhello\r\n"),
    body_case("chunk-size-nul", b"5\x00\r\n"),
    body_case("chunk-ext-no-name", b"5;=x\r\n"),
    body_case("chunk-ext-open-quote", b'5;a="x\r\n'),
    body_case("chunk-data-overrun", b"5\r\nhelloXX\r\n"),
    body_case("chunk-trailer-obs-fold", b"0\r\nX: a\r\n folded\r\n"),
    body_case("chunk-trailer-space-before-colon", b"0\r\nX : a\r\n"),
    # Field lines.
    h("obs-fold-space", req("X-A: b", " c")),
    h("obs-fold-tab", req("X-A: b", "\tc")),
    h("space-before-colon", req("X-A : b")),
    h("tab-before-colon", req("X-A\t: b")),
    h("space-before-colon-host", req("Host : {O}", host=False)),
    h("name-with-parens", req("X(A): b")),
    h("name-with-slash", req("X/A: b")),
    h("empty-name", req(": b")),
    h("no-colon", req("X-A b")),
    h("nul-in-value", req("X-A: b\x00c")),
    h("cr-in-value", req("X-A: b\rc")),
    h("del-in-value", req("X-A: b\x7fc")),
    h("soh-in-value", req("X-A: \x01")),
    h("esc-in-value", req("X-A: \x1b[2J")),
    h("nul-in-name", req("X-\x00A: b")),
    h("non-ascii-name", req("X-\xe9: b")),
    h("field-line-starts-with-space", req(" X-A: b")),
    h("bare-lf-in-a-field-line", b"GET http://{O}/ HTTP/1.1\r\nHost: {O}\r\n{AUTH}\nX: y\r\n\r\n"),
    h("bare-lf-everywhere", b"GET http://{O}/ HTTP/1.1\nHost: {O}\n{AUTH}\n\n"),
    h("bare-lf-head-never-ends", b"GET http://{O}/ HTTP/1.1\nHost: {O}\n"),
    h("bare-lf-ends-the-head", b"GET http://{O}/ HTTP/1.1\r\nHost: {O}\r\n{AUTH}\r\n\n"),
    h("bare-cr-line-ends", b"GET http://{O}/ HTTP/1.1\rHost: {O}\r{AUTH}\r\r"),
    # Request lines and versions.
    h("nul-in-target", req(start="GET http://{O}/\x00 HTTP/1.1")),
    h("nul-in-method", req(start="G\x00ET http://{O}/ HTTP/1.1")),
    h("bare-cr-in-request-line", req(start="GET http://{O}/\rx HTTP/1.1")),
    h("del-in-target", req(start="GET http://{O}/\x7f HTTP/1.1")),
    h("obs-text-in-target", req(start="GET http://{O}/\xe9 HTTP/1.1")),
    h("space-in-target", req(start="GET http://{O}/a b HTTP/1.1")),
    h("double-space", req(start="GET  http://{O}/ HTTP/1.1")),
    h("tab-separator", req(start="GET\thttp://{O}/ HTTP/1.1")),
    h("trailing-space", req(start="GET http://{O}/ HTTP/1.1 ")),
    h("leading-space", req(start=" GET http://{O}/ HTTP/1.1")),
    h("method-not-a-token", req(start="G(ET http://{O}/ HTTP/1.1")),
    h("lowercase-connect", req(start="connect {O} HTTP/1.1")),
    h("http-0.9-no-version", b"GET http://{O}/\r\n\r\n"),
    h("http-0.9-version", req(start="GET http://{O}/ HTTP/0.9"), 505),
    h("lowercase-version", req(start="GET http://{O}/ http/1.1")),
    h("version-without-minor", req(start="GET http://{O}/ HTTP/1")),
    h("version-two-digit-minor", req(start="GET http://{O}/ HTTP/1.10")),
    h("version-leading-zero", req(start="GET http://{O}/ HTTP/01.1")),
    h("http-1.2", req(start="GET http://{O}/ HTTP/1.2"), 505),
    h("http-2.0", req(start="GET http://{O}/ HTTP/2.0"), 505),
    h("http-3.0", req(start="GET http://{O}/ HTTP/3.0"), 505),
    h("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    h("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32),
    h("socks4-connect", b"\x04\x01\x00\x50\x7f\x00\x09\x02user\x00"),
    # Targets.
    h("userinfo", req(start="GET http://user@{O}/ HTTP/1.1")),
    h("userinfo-password", req(start="GET http://user:pw@{O}/ HTTP/1.1")),
    h("userinfo-empty", req(start="GET http://@{O}/ HTTP/1.1")),
    h("https-absolute", req(start="GET https://{O}/ HTTP/1.1")),
    h("ftp-absolute", req(start="GET ftp://{O}/ HTTP/1.1")),
    h("empty-host", req(start="GET http:///x HTTP/1.1")),
    h("target-empty-port", req(start="GET http://{OH}:/ HTTP/1.1")),
    h("target-port-0", req(start="GET http://{OH}:0/ HTTP/1.1")),
    h("target-port-leading-zero", req(start="GET http://{OH}:0{OP}/ HTTP/1.1")),
    h("target-port-65536", req(start="GET http://{OH}:65536/ HTTP/1.1")),
    h("target-port-wraps-to-origin", req(start="GET http://{OH}:{OPW}/ HTTP/1.1")),
    h("target-port-plus", req(start="GET http://{OH}:+{OP}/ HTTP/1.1")),
    h("fragment", req(start="GET http://{O}/#x HTTP/1.1")),
    h("asterisk-form", req(start="OPTIONS * HTTP/1.1")),
    h("authority-form-get", req(start="GET {O} HTTP/1.1")),
    h("hex-ipv4", req(start="GET http://0x7f.0.9.2:{OP}/ HTTP/1.1")),
    h("integer-ipv4", req(start="GET http://2130708738:{OP}/ HTTP/1.1")),
    h("short-ipv4", req(start="GET http://127.2:{OP}/ HTTP/1.1")),
    h("octal-ipv4", req(start="GET http://0177.0.9.2:{OP}/ HTTP/1.1")),
    h("backslash-host", req(start="GET http://{OH}\\@evil:{OP}/ HTTP/1.1")),
    h("percent-host", req(start="GET http://127%2e0.9.2:{OP}/ HTTP/1.1")),
    h("ipv6-zone", req(start="GET http://[fe80::1%25eth0]/ HTTP/1.1")),
    h("missing-host", req(host=False)),
    h("two-hosts", req("Host: {O}")),
    h("invalid-host-header", req("Host: a b", host=False)),
    h("host-with-userinfo", req("Host: u@{O}", host=False)),
    h("empty-host-header", req("Host: ", host=False)),
    h("host-port-0", req("Host: {OH}:0", host=False)),
    # CONNECT targets: exactly host:port, 1 <= port <= 65535, no sign, no leading zero.
    *(h(f"connect-{name}", connect_to(target)) for name, target in CONNECT_TARGETS.items()),
    h("connect-space-before-port", connect_to("{OH}: {OP}")),
    # Sizes: 8 KiB request line, 64 KiB header section, 100 fields.
    h("request-line-9k", req(start="GET http://{O}/" + "a" * 9000 + " HTTP/1.1"), 414),
    h("request-line-9k-unfinished", b"GET http://{O}/" + b"a" * 9000, 414),
    h("header-section-70k", req(*(f"X-Filler-{i}: {'v' * 1000}" for i in range(70))), 431),
    h("header-section-70k-unfinished", req(*(f"X-F-{i}: {'v' * 1000}" for i in range(70)))[:-4], 431),
    h("one-field-70k", req("X-Big: " + "v" * 70_000), 431),
    h("101-fields", req(*(f"X-F{i}: 1" for i in range(99))), 431),
    h("2000-fields", req(*(f"X: {i}" for i in range(2000))), 431),
    # Truncated: the client gives up in the middle of a head.
    h("eof-in-request-line", b"GET http://{O}/", half_close=True),
    h("eof-in-field-line", b"GET http://{O}/ HTTP/1.1\r\nHost: {O}\r\n{AUTH}\r\nX-A: b", half_close=True),
    h("eof-before-empty-line", b"GET http://{O}/ HTTP/1.1\r\nHost: {O}\r\n{AUTH}\r\n", half_close=True),
    h("eof-in-chunked-body", post("Transfer-Encoding: chunked", body=b"5\r\nhel"), half_close=True,
      head_forwarded=True),
    # Refused destinations (R13), and credentials (R13): never forwarded.
    h("ssrf-get", req("Connection: close", start="GET http://{R}/ HTTP/1.1"), 403),
    h("ssrf-connect", connect_to("{R}"), 403),
    h("ssrf-connect-v4-mapped", connect_to("[::ffff:127.0.0.1]:{RP}"), 403),
    h("ssrf-connect-v4-compatible", connect_to("[::127.0.0.1]:{RP}"), 403),
    h("ssrf-connect-localhost", connect_to("localhost:{RP}"), 403),
    h("ssrf-connect-zero-address", connect_to("0.0.0.0:{RP}"), 403),
    h("no-credentials", req("Connection: close", auth=False), 407),
    h("wrong-password", req("Proxy-Authorization: Basic " + base64.b64encode(b"globex-laptop:x").decode(),
                            "Connection: close", auth=False), 407),
    h("credentials-without-colon", req("Proxy-Authorization: Basic " + base64.b64encode(b"x").decode(),
                                       "Connection: close", auth=False), 407),
    h("two-credentials", req("{AUTH}", "Connection: close"), 407),
]

PATHS = ["first", "after-forward", "tls"]


def _http_params() -> list[Any]:
    # asyncio cannot half-close a TLS stream: the truncations run on the plain paths.
    return [pytest.param(case, path, id=f"{path}:{case.id}") for path in PATHS for case in HTTP_CASES
            if not (case.half_close and path == "tls")]


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 ") and b"\r\n\r\n" in answer, answer[:300]
    return int(answer[9:12])


@pytest.mark.parametrize(("case", "path"), _http_params())
async def test_hostile_http(stack: Stack, case: HttpCase, path: str) -> None:
    data = stack.fill(case.data)
    tls = stack.tls if path == "tls" else None
    reader, writer = await connect(pop_tls(stack.info) if tls else pop_plain(stack.info), tls)
    try:
        if path == "after-forward":
            await send(writer, stack.fill(GOOD_GET), half_close=False)
            assert (await read_response(reader)).status == 200
        mark, refused_mark = stack.origin.mark(), stack.refused.mark()
        await send(writer, data, half_close=case.half_close)
        answer = await answer_until_close(reader)
    finally:
        await close_writer(writer)
    assert status_of(answer) == case.status, answer[:300]
    assert b"\r\nconnection: close\r\n" in answer.lower().split(b"\r\n\r\n")[0] + b"\r\n"
    new_connections, new_bytes = stack.origin.since(mark)
    assert MARKER not in new_bytes
    if case.head_forwarded:
        assert new_bytes.count(b"\r\n\r\n") <= 1, new_bytes[:300]
    else:
        assert (new_connections, new_bytes) == (0, b""), new_bytes[:300]
    assert stack.refused.since(refused_mark) == (0, b"")


# --- SOCKS5 cases --------------------------------------------------------------------


def ipv4(host: str) -> bytes:
    return b"\x01" + ipaddress.IPv4Address(host).packed


def ipv6(host: str) -> bytes:
    return b"\x04" + ipaddress.IPv6Address(host).packed


def domain(name: bytes) -> bytes:
    return bytes([3, len(name)]) + name


def socks_request(command: int, address: bytes, port: int, *, version: int = 5, reserved: int = 0) -> bytes:
    return bytes([version, command, reserved]) + address + struct.pack("!H", port)


def reply(code: int) -> bytes:
    """A failure reply as the PoP sends it: BND.ADDR 0.0.0.0, BND.PORT 0."""
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


@dataclass(frozen=True)
class SocksCase:
    """`stage`: what precedes `data` in the dialogue: nothing ("greeting"), a greeting that
    offers username/password ("auth"), or a successful login ("request"). `answer` is what
    the PoP sends after the stage's own replies, until it closes (b"": no reply at all)."""

    id: str
    stage: str
    data: Callable[[Stack], bytes]
    answer: bytes
    half_close: bool = False


def g(case_id: str, data: bytes, answer: bytes, **flags: bool) -> SocksCase:
    return SocksCase(case_id, "greeting", lambda _stack: data, answer, **flags)


def a(case_id: str, data: bytes, answer: bytes, **flags: bool) -> SocksCase:
    return SocksCase(case_id, "auth", lambda _stack: data, answer, **flags)


def r(case_id: str, data: Callable[[Stack], bytes], answer: bytes, **flags: bool) -> SocksCase:
    return SocksCase(case_id, "request", data, answer, **flags)


def to_origin(command: int = 1, **fields: int) -> Callable[[Stack], bytes]:
    return lambda stack: socks_request(command, ipv4(ORIGIN_HOST), stack.origin_address[1], **fields)


def to_name(name: bytes, command: int = 1) -> Callable[[Stack], bytes]:
    return lambda stack: socks_request(command, domain(name), stack.origin_address[1])


def to_refused(address: bytes) -> Callable[[Stack], bytes]:
    return lambda stack: socks_request(1, address, stack.refused_address[1])


NO_METHOD = b"\x05\xff"
AUTH_FAILED = b"\x01\x01"

SOCKS_CASES = [
    # Greeting: version 5, 1..255 methods, username/password among them.
    g("no-methods", b"\x05\x00", NO_METHOD),
    g("only-no-auth", b"\x05\x01\x00", NO_METHOD),
    g("only-gssapi", b"\x05\x01\x01", NO_METHOD),
    g("no-auth-and-gssapi", b"\x05\x02\x00\x01", NO_METHOD),
    g("private-methods-only", b"\x05\x03\x80\x81\xfe", NO_METHOD),
    g("255-methods-without-02", b"\x05\xff" + bytes([0, 1, *range(3, 256)]), NO_METHOD),
    g("no-acceptable-as-method", b"\x05\x01\xff", NO_METHOD),
    g("greeting-cut-short", b"\x05\x03\x02", b"", half_close=True),
    g("version-byte-only", b"\x05", b"", half_close=True),
    # Username/password sub-negotiation (RFC 1929).
    a("auth-version-0", b"\x00\x01u\x01p", b""),
    a("auth-version-5", b"\x05\x01u\x01p", b""),
    a("auth-version-2", b"\x02\x01u\x01p", b""),
    a("empty-username", b"\x01\x00\x01p", AUTH_FAILED),
    a("empty-password", b"\x01\x0dglobex-laptop\x00", AUTH_FAILED),
    a("username-not-utf8", b"\x01\x02\xff\xfe\x01p", AUTH_FAILED),
    a("password-not-utf8", b"\x01\x0dglobex-laptop\x02\xc3\x28", AUTH_FAILED),
    a("wrong-password", b"\x01\x0dglobex-laptop\x05wrong", AUTH_FAILED),
    a("unknown-user", b"\x01\x07mallory\x05wrong", AUTH_FAILED),
    a("nul-in-username", b"\x01\x0eglobex-laptop\x00\x05wrong", AUTH_FAILED),
    a("username-longer-than-sent", b"\x01\x20short", b"", half_close=True),
    a("password-longer-than-sent", b"\x01\x01u\x20short", b"", half_close=True),
    # Requests, after a successful login.
    r("request-version-4", to_origin(version=4), b""),
    r("request-version-0", to_origin(version=0), b""),
    r("bind", to_origin(command=2), reply(0x07)),
    r("command-0", to_origin(command=0), reply(0x07)),
    r("command-4", to_origin(command=4), reply(0x07)),
    r("command-255", to_origin(command=255), reply(0x07)),
    r("reserved-1", to_origin(reserved=1), reply(0x01)),
    r("reserved-255", to_origin(reserved=255), reply(0x01)),
    r("address-type-0", lambda s: socks_request(1, b"\x00" + b"\x7f\x00\x09\x02", s.origin_address[1]), reply(0x08)),
    r("address-type-2", lambda s: socks_request(1, b"\x02" + b"\x7f\x00\x09\x02", s.origin_address[1]), reply(0x08)),
    r("address-type-5", lambda s: socks_request(1, b"\x05" + b"\x7f\x00\x09\x02", s.origin_address[1]), reply(0x08)),
    r("address-type-255", lambda s: socks_request(1, b"\xff" + b"\x7f\x00\x09\x02", s.origin_address[1]), reply(0x08)),
    r("empty-domain", lambda s: socks_request(1, b"\x03\x00", s.origin_address[1]), reply(0x01)),
    r("nul-in-domain", to_name(b"127.0.9\x00.2"), reply(0x01)),
    r("nul-after-domain", to_name(b"127.0.9.2\x00"), reply(0x01)),
    r("all-nul-domain", to_name(b"\x00\x00\x00\x00"), reply(0x01)),
    r("space-in-domain", to_name(b"127.0.9.2 "), reply(0x01)),
    r("non-ascii-domain", to_name("é.example".encode()), reply(0x01)),
    r("bracketed-ipv6-domain", to_name(b"[::1]"), reply(0x01)),
    r("integer-ipv4-domain", to_name(b"2130708738"), reply(0x01)),
    r("hex-ipv4-domain", to_name(b"0x7f.0.9.2"), reply(0x01)),
    r("short-ipv4-domain", to_name(b"127.2"), reply(0x01)),
    r("octal-ipv4-domain", to_name(b"0177.0.9.2"), reply(0x01)),
    r("empty-label-domain", to_name(b"a..b"), reply(0x01)),
    r("64-byte-label-domain", to_name(b"a" * 64 + b".example"), reply(0x01)),
    r("domain-with-port", to_name(b"127.0.9.2:80"), reply(0x01)),
    r("ipv6-zone-domain", to_name(b"fe80::1%1"), reply(0x01)),
    r("loopback-zone-domain", to_name(b"::1%lo"), reply(0x01)),
    r("v4-mapped-zone-domain", to_name(b"::ffff:127.0.9.2%1"), reply(0x01)),
    r("ipv4-port-0", lambda s: socks_request(1, ipv4(ORIGIN_HOST), 0), reply(0x01)),
    r("domain-port-0", lambda s: socks_request(1, domain(ORIGIN_HOST.encode()), 0), reply(0x01)),
    r("ipv6-port-0", lambda s: socks_request(1, ipv6("::ffff:127.0.9.2"), 0), reply(0x01)),
    r("request-cut-short", lambda s: socks_request(1, ipv4(ORIGIN_HOST), 80)[:6], b"", half_close=True),
    r("domain-cut-short", lambda s: b"\x05\x01\x00\x03\x20short", b"", half_close=True),
    # Refused destinations (R13): "not allowed by ruleset", nothing reaches them.
    r("ssrf-ipv4", to_refused(ipv4(REFUSED_HOST)), reply(0x02)),
    r("ssrf-v4-mapped-ipv6", to_refused(ipv6("::ffff:127.0.0.1")), reply(0x02)),
    r("ssrf-localhost-name", to_refused(domain(b"localhost")), reply(0x02)),
    r("ssrf-ipv4-as-name", to_refused(domain(REFUSED_HOST.encode())), reply(0x02)),
    r("ssrf-v4-mapped-as-name", to_refused(domain(b"::ffff:127.0.0.1")), reply(0x02)),
    r("ssrf-zero-address", to_refused(ipv4("0.0.0.0")), reply(0x02)),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in SOCKS_CASES])
async def test_hostile_socks5(stack: Stack, case: SocksCase) -> None:
    prefix, prefix_answer = {
        "greeting": (b"", b""),
        "auth": (b"\x05\x01\x02", b"\x05\x02"),
        "request": (stack.login(), b"\x05\x02\x01\x00"),
    }[case.stage]
    mark, refused_mark = stack.origin.mark(), stack.refused.mark()
    reader, writer = await connect(pop_plain(stack.info))
    try:
        await send(writer, prefix + case.data(stack), half_close=case.half_close)
        answer = await answer_until_close(reader)
    finally:
        await close_writer(writer)
    assert answer == prefix_answer + case.answer
    assert stack.origin.since(mark) == (0, b"")
    assert stack.refused.since(refused_mark) == (0, b"")


# --- after the suite ----------------------------------------------------------------


async def test_nothing_reached_the_origin_and_nothing_leaked(stack: Stack) -> None:
    """Runs last (file order): the origins saw only the controls and the heads of the
    after-forward path's good requests; the PoPs hold no more descriptors or tasks than
    after the controls."""
    refused_connections, _ = stack.refused.since((0, 0))
    assert refused_connections == 0
    assert MARKER not in stack.origin.received

    def quiet() -> bool:
        return open_fds() <= stack.fds and len(asyncio.all_tasks()) <= stack.tasks

    assert await settle(quiet, within=5.0), (
        f"{open_fds()} descriptors (after the controls: {stack.fds}): {describe_fds()}; "
        f"{len(asyncio.all_tasks())} tasks (after the controls: {stack.tasks})")
