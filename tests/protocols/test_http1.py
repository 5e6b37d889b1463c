"""The HTTP/1.1 proxy codec: request and response heads, forwarding, body framing."""

from __future__ import annotations

import base64
import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.protocols.http1 import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    BodyFraming,
    BodyTracker,
    HttpError,
    ProtocolError,
    RequestHead,
    RequestHeadReader,
    ResponseHead,
    ResponseHeadReader,
    connect_established,
    error_response,
    forward_head,
    forward_response_head,
    normalize_host,
    proxy_auth_required,
    simple_response,
)


def parse(raw: bytes, **limits: int) -> RequestHead:
    reader = RequestHeadReader(**limits)
    reader.feed(raw)
    head = reader.next_head()
    assert head is not None
    return head


def parse_bytewise(raw: bytes) -> tuple[RequestHead | None, bytes]:
    reader = RequestHeadReader()
    head = None
    for i in range(len(raw)):
        reader.feed(raw[i : i + 1])
        head = reader.next_head()
        if head is not None:
            reader.feed(raw[i + 1 :])
            break
    return head, reader.remainder()


def rejected(raw: bytes, **limits: int) -> HttpError:
    reader = RequestHeadReader(**limits)
    reader.feed(raw)
    with pytest.raises(HttpError) as caught:
        reader.next_head()
    with pytest.raises(HttpError):  # and again on every later call
        reader.next_head()
    return caught.value


def get(*fields: str, target: str = "http://example.com/", version: str = "1.1") -> bytes:
    lines = [f"GET {target} HTTP/{version}", *fields, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- valid requests --------------------------------------------------------------------

CONNECT_V6 = b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n"
# fmt: off
VALID = {
    "absolute with query": (
        get("Host: a", target="http://Example.COM/a/b?x=1&y=%20"),
        dict(host="example.com", port=80, scheme="http", path="/a/b?x=1&y=%20"),
    ),
    "explicit port": (
        get("Host: a", target="http://a.example:8080/"),
        dict(host="a.example", port=8080, authority="a.example:8080", path="/"),
    ),
    "uppercase scheme, empty path": (
        get("Host: a", target="HTTP://a"), dict(host="a", port=80, path="/", authority="a"),
    ),
    "query without path": (get("Host: a", target="http://a?q"), dict(path="/?q")),
    "underscore, trailing dot": (
        get("Host: x", target="http://my_h.example./"), dict(host="my_h.example."),
    ),
    "ipv4 literal": (get("Host: x", target="http://192.0.2.7:81/"), dict(host="192.0.2.7")),
    "ipv6 literal": (
        get("Host: x", target="http://[2001:DB8:0::1]:8080/p"),
        dict(host="2001:db8::1", port=8080, authority="[2001:db8::1]:8080"),
    ),
    "connect": (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        dict(is_connect=True, host="example.com", port=443, scheme=None, path="", body=NO_BODY),
    ),
    "connect ipv6": (CONNECT_V6, dict(host="2001:db8::1", authority="[2001:db8::1]:443")),
    "connect max port, content-length 0": (
        b"CONNECT a:65535 HTTP/1.1\r\nContent-Length: 0\r\n\r\n", dict(port=65535, body=NO_BODY),
    ),
    "origin form": (
        get("Host: pop.example:8080", target="/proxy.pac"),
        dict(is_origin_form=True, host="pop.example", port=8080, path="/proxy.pac", scheme=None),
    ),
    "origin form without host (1.0)": (
        get(target="/health", version="1.0"), dict(is_origin_form=True, host="", authority=""),
    ),
    "http/1.0 without host": (get(version="1.0"), dict(version="HTTP/1.0", host="example.com")),
    "htab and obs-text in value, OWS trimmed": (
        get("Host: a", "X-A: \t a\tb\xe9 \t"),
        dict(headers=((b"Host", b"a"), (b"X-A", b"a\tb\xe9"))),
    ),
    "content-length duplicates agree": (
        get("Host: a", "Content-Length: 5, 5", "content-length: 005"),
        dict(body=BodyFraming.content_length(5)),
    ),
    "chunked": (get("Host: a", "Transfer-Encoding: chunked"), dict(body=CHUNKED)),
    "gzip then chunked": (
        get("Host: a", "Transfer-Encoding: gzip", "Transfer-Encoding: CHUNKED"), dict(body=CHUNKED),
    ),
    "credentials": (
        get("Host: a", "Proxy-Authorization: " + basic("alice@acme", "p:ss wörd")),
        dict(proxy_credentials=("alice@acme", "p:ss wörd")),
    ),
    "leading empty lines ignored": (b"\r\n\r\n" + get("Host: a"), dict(host="example.com")),
}
# fmt: on


@pytest.mark.parametrize("raw, expected", VALID.values(), ids=VALID.keys())
def test_valid_requests(raw: bytes, expected: dict[str, object]) -> None:
    head = parse(raw)
    for name, value in expected.items():
        assert getattr(head, name) == value, name
    assert parse_bytewise(raw) == (head, b"")


@pytest.mark.parametrize(
    "version, fields, keep_alive",
    [
        ("1.1", (), True),
        ("1.1", ("Connection: close",), False),
        ("1.1", ("Connection: Keep-Alive, CLOSE",), False),
        ("1.1", ("Proxy-Connection: close",), False),
        ("1.0", (), False),
        ("1.0", ("Connection: keep-alive",), True),
        ("1.0", ("Proxy-Connection: Keep-Alive",), True),
        ("1.0", ("Connection: ,, keep-alive ,",), True),
    ],
)
def test_keep_alive_defaults(version: str, fields: tuple[str, ...], keep_alive: bool) -> None:
    assert parse(get("Host: a", *fields, version=version)).keep_alive is keep_alive


def test_pipelined_requests_and_remainder() -> None:
    second = get("Host: b", target="http://b/")
    post = b"POST http://c/ HTTP/1.1\r\nHost: c\r\nContent-Length: 4\r\n\r\nbody"
    reader = RequestHeadReader()
    reader.feed(get("Host: a") + second + post + second)
    assert reader.next_head() is not None
    assert reader.next_head() is not None  # no body: the next head follows directly
    head = reader.next_head()
    assert head is not None and head.body == BodyFraming.content_length(4)
    with pytest.raises(RuntimeError):  # the bytes after a head with a body are the body
        reader.next_head()
    rest = reader.remainder()
    assert rest == b"body" + second
    tracker = BodyTracker(head.body)
    used = tracker.feed(rest)
    assert (used, tracker.done) == (4, True)
    reader.feed(rest[used:])
    assert reader.next_head() is not None
    assert reader.next_head() is None


def test_connect_and_close_block_until_remainder() -> None:
    for raw in (b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03", get("Host: a", "Connection: close")):
        reader = RequestHeadReader()
        reader.feed(raw + get("Host: x"))
        assert reader.next_head() is not None
        with pytest.raises(RuntimeError):
            reader.next_head()
        assert reader.remainder().endswith(get("Host: x"))


def test_header_lookup_and_repr_hides_secrets() -> None:
    head = parse(get("Host: a", "User-Agent: curl", "Proxy-Authorization: " + basic("u", "s3cr")))
    assert head.header("user-agent") == b"curl"
    assert head.header("X-None") is None
    assert "s3cr" not in repr(head) and basic("u", "s3cr")[6:] not in repr(head)


@pytest.mark.parametrize(
    "fields",
    [
        ("Proxy-Authorization: Bearer abc",),
        ("Proxy-Authorization: Basic",),
        ("Proxy-Authorization: Basic !!!",),
        ("Proxy-Authorization: Basic " + base64.b64encode(b"nocolon").decode(),),
        ("Proxy-Authorization: Basic " + base64.b64encode(b"u:p").decode()[:-1],),  # padding
        ("Proxy-Authorization: Basic " + base64.b64encode(b"\xff:\xfe").decode(),),  # UTF-8
        ("Proxy-Authorization: Basic " + base64.b64encode(b"u:p\x00").decode(),),
        ("Proxy-Authorization: " + basic("a", "b"), "Proxy-Authorization: " + basic("a", "b")),
    ],
)
def test_malformed_credentials_are_no_credentials(fields: tuple[str, ...]) -> None:
    assert parse(get("Host: a", *fields)).proxy_credentials is None


# --- rejected requests -----------------------------------------------------------------


def h(*fields: str, target: str = "http://a/", version: str = "1.1") -> bytes:
    return get("Host: a", *fields, target=target, version=version)


# fmt: off
REJECTED = {
    # framing
    "content-length and te": (h("Content-Length: 3", "Transfer-Encoding: chunked"), 400),
    "content-length lines differ": (h("Content-Length: 3", "Content-Length: 4"), 400),
    "content-length list differs": (h("Content-Length: 3, 4"), 400),
    "content-length plus sign": (h("Content-Length: +3"), 400),
    "content-length minus sign": (h("Content-Length: -1"), 400),
    "content-length non-digit": (h("Content-Length: 3a"), 400),
    "content-length hex": (h("Content-Length: 0x3"), 400),
    "content-length empty": (h("Content-Length: "), 400),
    "content-length empty element": (h("Content-Length: ,3"), 400),
    "content-length inner space": (h("Content-Length: 1 2"), 400),
    "content-length huge": (h("Content-Length: " + "9" * 19), 400),
    "content-length non-ascii digit": (h("Content-Length: \xb2"), 400),
    "te not chunked": (h("Transfer-Encoding: gzip"), 400),
    "te chunked not last": (h("Transfer-Encoding: chunked, gzip"), 400),
    "te chunked twice": (h("Transfer-Encoding: chunked, chunked"), 400),
    "te chunked on 2 lines": (h("Transfer-Encoding: chunked", "Transfer-encoding: chunked"), 400),
    "te with parameter": (h("Transfer-Encoding: chunked;q=1"), 400),
    "te empty element": (h("Transfer-Encoding: chunked,"), 400),
    "te unknown coding": (h("Transfer-Encoding: foo, chunked"), 501),
    "te identity": (h("Transfer-Encoding: identity"), 501),
    "te in http/1.0": (h("Transfer-Encoding: chunked", version="1.0"), 400),
    "content_length lookalike": (h("Content_Length: 3"), 400),
    "transfer_encoding lookalike": (h("Transfer_Encoding: chunked"), 400),
    "mixed lookalike": (h("transfer-Encoding_: x", "Transfer_encoding: chunked"), 400),
    "connection names content-length": (h("Connection: Content-Length", "Content-Length: 1"), 400),
    "connection names host": (h("Connection: host"), 400),
    "connection not a token": (h("Connection: a b"), 400),
    "connect with body": (b"CONNECT a:443 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi", 400),
    "connect chunked": (b"CONNECT a:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    # field syntax
    "obs-fold": (h("X-A: b", " c"), 400),
    "obs-fold with tab": (h("X-A: b", "\tc"), 400),
    "space before colon": (get("Host : a"), 400),
    "tab before colon": (get("Host\t: a"), 400),
    "invalid name": (h("X(A): b"), 400),
    "empty name": (h(": b"), 400),
    "no colon": (h("X-A b"), 400),
    "nul in value": (h("X-A: b\x00c"), 400),
    "bare cr in value": (h("X-A: b\rc"), 400),
    "del in value": (h("X-A: b\x7fc"), 400),
    "control in value": (h("X-A: \x01"), 400),
    "non-ascii name": (h("X-\xe9: b"), 400),
    # request line
    "nul in request line": (b"GET http://a/\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "double space": (b"GET  http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "tab separator": (b"GET\thttp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "trailing space": (b"GET http://a/ HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
    "http/0.9": (b"GET /\r\n\r\n", 400),
    "lowercase version": (h().replace(b"HTTP/1.1", b"http/1.1"), 400),
    "version without minor": (b"GET http://a/ HTTP/1\r\nHost: a\r\n\r\n", 400),
    "http/1.2": (h(version="1.2"), 505),
    "http/2.0": (h(version="2.0"), 505),
    "h2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "bare lf": (b"GET http://a/ HTTP/1.1\nHost: a\n\n", 400),
    "bare lf, head never ends": (b"GET http://a/ HTTP/1.1\nHost: a\n", 400),
    "bare lf in a field line": (b"GET http://a/ HTTP/1.1\r\nHost: a\n\r\n\r\n", 400),
    "tls client hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    # targets
    "userinfo": (h(target="http://user@a/"), 400),
    "userinfo with password": (h(target="http://u:p@a/"), 400),
    "https absolute": (h(target="https://a/"), 400),
    "other scheme": (h(target="ftp://a/"), 400),
    "empty host": (h(target="http:///x"), 400),
    "empty port": (h(target="http://a:/"), 400),
    "port zero": (h(target="http://a:0/"), 400),
    "port leading zero": (h(target="http://a:080/"), 400),
    "fragment": (h(target="http://a/#x"), 400),
    "asterisk": (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "authority form for get": (h(target="a:80"), 400),
    "hex ipv4": (h(target="http://0x7f.1/"), 400),
    "integer ipv4": (h(target="http://2130706433/"), 400),
    "short ipv4": (h(target="http://127.1/"), 400),
    "octal ipv4": (h(target="http://0177.0.0.1/"), 400),
    "empty label": (h(target="http://a..b/"), 400),
    "backslash in host": (h(target="http://a\\b/"), 400),
    "percent in host": (h(target="http://a%2eb/"), 400),
    "ipv6 zone": (h(target="http://[fe80::1%25eth0]/"), 400),
    "missing host (1.1)": (get(), 400),
    "two hosts": (get("Host: a", "Host: a"), 400),
    "invalid host": (get("Host: a b"), 400),
    "host with userinfo": (get("Host: u@a"), 400),
    "empty host header": (get("Host: "), 400),
}
# fmt: on
# fmt: off
CONNECT_TARGETS = [
    "example.com", "example.com:", "example.com:080", "example.com:+80", "example.com:-80",
    "example.com:65536", "example.com:99999", "example.com:0", "example.com:00",
    "example.com:443/path", "example.com:443:1", "[2001:db8::1]", "[2001:db8::1]443",
    "[2001:db8::1]:443x", "2001:db8::1:443", "[fe80::1%eth0]:443", "[v1.x]:443", "[1.2.3.4]:443",
    "http://example.com:443", "user@example.com:443", ":443", "0x7f.1:443",
]
# fmt: on
for target in CONNECT_TARGETS:
    REJECTED[f"connect {target}"] = (f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(), 400)


@pytest.mark.parametrize("raw, status", REJECTED.values(), ids=REJECTED.keys())
def test_rejected_requests(raw: bytes, status: int) -> None:
    assert rejected(raw).status == status
    reader = RequestHeadReader()  # byte at a time: the same verdict, and never a hang
    with pytest.raises(HttpError) as caught:
        for i in range(len(raw)):
            reader.feed(raw[i : i + 1])
            if reader.next_head() is not None:
                reader.remainder()
    assert isinstance(caught.value, ProtocolError)


@pytest.mark.parametrize(
    "raw, status, limits",
    [
        (get("Host: a", target="http://a/" + "x" * 8200), 414, {}),
        (b"GET http://a/" + b"x" * 9000, 414, {}),  # incomplete line
        (get("Host: a", target="http://a/" + "x" * 60), 414, {"max_request_line": 64}),
        (get("Host: a", "X: " + "v" * 70_000), 431, {}),
        (get("Host: a", "X: " + "v" * 70_000)[:-4], 431, {}),  # incomplete head
        (get("Host: a", *(f"X-{i}: v" for i in range(100))), 431, {}),  # 101 fields
        (get("Host: a", "X: " + "v" * 40), 431, {"max_header_section": 32}),
        (get("Host: a", "X: 1", "Y: 2"), 431, {"max_fields": 2}),
    ],
)
def test_limits(raw: bytes, status: int, limits: dict[str, int]) -> None:
    assert rejected(raw, **limits).status == status


def test_limits_are_inclusive() -> None:
    assert parse(get("Host: a", *(f"X-{i}: v" for i in range(99))))
    line = get("Host: a", target="http://a/" + "x" * 45).split(b"\r\n")[0]
    assert parse(line + b"\r\nHost: a\r\n\r\n", max_request_line=len(line))


# --- forwarding ------------------------------------------------------------------------


def upstream_view(data: bytes) -> h11.Request:
    """What an independent HTTP/1.1 implementation reads from the forwarded head."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


def test_forward_head_removes_hop_by_hop_and_adds_via() -> None:
    head = parse(
        get(
            "Host: other.example",
            "Connection: keep-alive, X-Secret, Upgrade",
            "Keep-Alive: timeout=5",
            "Proxy-Connection: keep-alive",
            "Proxy-Authorization: " + basic("u", "p"),
            "Proxy-Authenticate: Basic",
            "TE: trailers",
            "Trailer: X-T",
            "Upgrade: websocket",
            "X-Secret: 1",
            "Via: 1.1 upstream-proxy",
            "User-Agent: curl/8",
            "content-length: 3",
            target="http://api.example:8080/v1?q=1",
        )
    )
    out = forward_head(head, "egressd-lax")
    assert out == (
        b"GET /v1?q=1 HTTP/1.1\r\nHost: api.example:8080\r\nVia: 1.1 upstream-proxy\r\n"
        b"User-Agent: curl/8\r\ncontent-length: 3\r\nVia: 1.1 egressd-lax\r\n\r\n"
    )
    request = upstream_view(out + b"abc")
    assert request.target == b"/v1?q=1"
    assert (b"host", b"api.example:8080") in request.headers


@pytest.mark.parametrize(
    "raw, expected",
    [
        (get(version="1.0"), b"GET / HTTP/1.1\r\nHost: example.com\r\nVia: 1.0 egressd\r\n\r\n"),
        (
            get("Host: x", target="http://[2001:db8::1]:81/"),
            b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:81\r\nVia: 1.1 egressd\r\n\r\n",
        ),
        (
            get("Host: a", "Content-Length: 2, 2", "Content-Length: 02", target="http://a/"),
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nVia: 1.1 egressd\r\n\r\n",
        ),
        (
            get("Host: a", "Transfer-Encoding: gzip, chunked", target="http://a/"),
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n"
            b"Via: 1.1 egressd\r\n\r\n",
        ),
    ],
)
def test_forward_head_cases(raw: bytes, expected: bytes) -> None:
    assert forward_head(parse(raw), "egressd") == expected


def test_forward_head_connection_close_and_misuse() -> None:
    head = parse(get("Host: a"))
    assert forward_head(head, "e", connection_close=True).endswith(b"Connection: close\r\n\r\n")
    for bad in (parse(b"CONNECT a:1 HTTP/1.1\r\n\r\n"), parse(get("Host: a", target="/"))):
        with pytest.raises(ValueError):
            forward_head(bad, "e")
    with pytest.raises(ValueError):
        forward_head(head, "e\r\nX-Injected: 1")


# --- responses -------------------------------------------------------------------------


def response(raw: bytes, method: str = "GET") -> ResponseHead:
    reader = ResponseHeadReader(method)
    reader.feed(raw)
    head = reader.next_head()
    assert head is not None
    return head


CL0, CL5 = BodyFraming.content_length(0), BodyFraming.content_length(5)


# fmt: off
RESPONSE_FRAMING = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "GET", CL5, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", CHUNKED, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "GET", UNTIL_CLOSE, False),
        (b"HTTP/1.1 200 OK\r\n\r\n", "GET", UNTIL_CLOSE, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", NO_BODY, True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", NO_BODY, True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET", NO_BODY, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "CONNECT", NO_BODY, True),
        (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", "GET", CL0, True),
        (b"HTTP/1.1 200 \r\nConnection: close\r\nContent-Length: 0\r\n\r\n", "GET", CL0,
         False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", CL0, False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", "GET", CL0,
         True),
]
# fmt: on


@pytest.mark.parametrize("raw, method, body, keep_alive", RESPONSE_FRAMING)
def test_response_framing(raw: bytes, method: str, body: BodyFraming, keep_alive: bool) -> None:
    head = response(raw, method)
    assert (head.body, head.keep_alive) == (body, keep_alive)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 304 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 999 Nine\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"v" * 70_000 + b"\r\n\r\n",
    ],
)
def test_bad_responses_are_502(raw: bytes) -> None:
    reader = ResponseHeadReader("GET")
    reader.feed(raw)
    with pytest.raises(HttpError) as caught:
        reader.next_head()
    assert caught.value.status == 502


def test_interim_responses_then_final() -> None:
    reader = ResponseHeadReader("POST")
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    reader.feed(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nokHTTP/1.1")
    statuses = []
    while (head := reader.next_head()) is not None:
        statuses.append((head.status, head.is_interim, head.body))
        if not head.is_interim:
            break
    assert statuses == [
        (100, True, NO_BODY),
        (103, True, NO_BODY),
        (201, False, BodyFraming.content_length(2)),
    ]
    with pytest.raises(RuntimeError):
        reader.next_head()
    assert reader.remainder() == b"okHTTP/1.1"


def test_forward_response_head() -> None:
    head = response(
        b"HTTP/1.1 200 Fine\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
        b"Proxy-Authenticate: Basic\r\nContent-Length: 3,3\r\nServer: s\r\n\r\n"
    )
    assert forward_response_head(head, "egressd") == (
        b"HTTP/1.1 200 Fine\r\nContent-Length: 3\r\nServer: s\r\nVia: 1.1 egressd\r\n\r\n"
    )
    closing = forward_response_head(head, "egressd", close=True)
    assert closing.endswith(b"Via: 1.1 egressd\r\nConnection: close\r\n\r\n")
    until_close = response(b"HTTP/1.0 200 OK\r\n\r\n")
    assert forward_response_head(until_close, "e").endswith(
        b"Via: 1.0 e\r\nConnection: close\r\n\r\n"
    )
    interim = response(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert (
        forward_response_head(interim, "e", close=True)
        == b"HTTP/1.1 100 Continue\r\nVia: 1.1 e\r\n\r\n"
    )


# --- body framing ----------------------------------------------------------------------

CHUNKED_BODY = (
    b"5\r\nhello\r\n"
    b'1A;name=value;quoted="a \\"b\\" c";flag\r\n' + b"z" * 26 + b"\r\n"
    b"00a ; x = y\r\n0123456789\r\n"
    b"0\r\nX-Trailer: t\r\nX-Other:\r\n\r\n"
)
NEXT_REQUEST = b"GET http://next/ HTTP/1.1\r\n"


def test_chunked_body_split_at_every_boundary() -> None:
    data = CHUNKED_BODY + NEXT_REQUEST
    for cut in range(len(data) + 1):
        tracker = BodyTracker(CHUNKED)
        used = tracker.feed(data[:cut])
        if tracker.done:
            assert used == len(CHUNKED_BODY)
        else:
            assert used == cut
            used += tracker.feed(data[cut:])
        assert (used, tracker.done) == (len(CHUNKED_BODY), True)
    tracker = BodyTracker(CHUNKED)
    total = sum(tracker.feed(data[i : i + 1]) for i in range(len(data)))
    assert (total, tracker.done) == (len(CHUNKED_BODY), True)


def test_content_length_body() -> None:
    tracker = BodyTracker(BodyFraming.content_length(10))
    assert [tracker.feed(b"abcd"), tracker.done, tracker.feed(b"efghijKL"), tracker.done] == [
        4, False, 6, True,
    ]  # fmt: skip
    assert tracker.feed(b"more") == 0
    for framing in (NO_BODY, BodyFraming.content_length(0)):
        tracker = BodyTracker(framing)
        assert tracker.done and tracker.feed(b"GET") == 0


def test_until_close_and_eof() -> None:
    tracker = BodyTracker(UNTIL_CLOSE)
    assert tracker.feed(b"x" * 100) == 100 and not tracker.done
    tracker.eof()
    assert tracker.done
    for framing in (BodyFraming.content_length(3), CHUNKED):
        tracker = BodyTracker(framing, error_status=502)
        tracker.feed(b"1")
        with pytest.raises(HttpError) as caught:
            tracker.eof()
        assert caught.value.status == 502


@pytest.mark.parametrize(
    "body",
    [
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"g\r\n",
        b"\r\n",
        b"1" * 17 + b"\r\n",
        b"8000000000000000\r\n",  # 2**63: negative in an int64
        b"ffffffffffffffff\r\n",
        b"5;\r\n",
        b"5;=x\r\n",
        b'5;a="open\r\n',
        b"5;a=b c\r\n",
        b"5\nhello\r\n",
        b"5\r\nhelloX\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhello\rX",
        b"5\x00\r\n",
        b"0\r\nX: a\r\n folded\r\n\r\n",
        b"0\r\nX : a\r\n\r\n",
        b"0\r\nX: a\x00\r\n\r\n",
        b"0\r\n\n",
        b"5" + b";a=b" * 2000 + b"\r\n",
    ],
)
def test_bad_chunked_framing(body: bytes) -> None:
    for chunks in ([body], [body[i : i + 1] for i in range(len(body))]):
        tracker = BodyTracker(CHUNKED)
        with pytest.raises(HttpError) as caught:
            for chunk in chunks:
                tracker.feed(chunk)
        assert caught.value.status == 400
        with pytest.raises(HttpError):
            tracker.feed(b"0\r\n\r\n")


def test_trailer_limits() -> None:
    tracker = BodyTracker(CHUNKED, max_trailer_fields=2)
    with pytest.raises(HttpError):
        tracker.feed(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    tracker = BodyTracker(CHUNKED, max_trailer_section=10)
    with pytest.raises(HttpError):
        tracker.feed(b"0\r\nA: 1234567890\r\n\r\n")


# --- responses made by the proxy -------------------------------------------------------


def client_view(data: bytes, method: bytes = b"GET") -> list[object]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    client.receive_data(data)
    events: list[object] = []
    while (event := client.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


def test_simple_response_and_helpers() -> None:
    out = simple_response(403, "Forbidden", b"no", (("Content-Type", "text/plain"),))
    assert out == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\nno"
    )
    events = client_view(out)
    assert isinstance(events[0], h11.Response) and events[0].status_code == 403
    assert simple_response(204, "No Content", close=False) == b"HTTP/1.1 204 No Content\r\n\r\n"
    auth = proxy_auth_required()
    assert b'\r\nProxy-Authenticate: Basic realm="egressd"\r\n' in auth
    assert isinstance(client_view(auth)[0], h11.Response)
    assert connect_established() == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    page = error_response(HttpError(431, "header section too large"))
    assert page.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert page.endswith(b"header section too large\n")


@pytest.mark.parametrize(
    "call",
    [
        lambda: simple_response(200, "OK\r\nX: 1"),
        lambda: simple_response(200, "OK", headers=(("X\r\nY", "1"),)),
        lambda: simple_response(200, "OK", headers=(("X", "1\r\nY: 2"),)),
        lambda: simple_response(204, "No Content", b"body"),
        lambda: proxy_auth_required('a"b'),
    ],
)
def test_response_builders_refuse_injection(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_normalize_host() -> None:
    assert normalize_host("WWW.Example.COM") == "www.example.com"
    assert normalize_host("10.0.0.1") == "10.0.0.1"
    for bad in ("", ".", "a..b", "a b", "a" * 64 + ".com", "1.2.3.4.5", "01.2.3.4", "x.0x1"):
        assert normalize_host(bad) is None, bad


# --- properties ------------------------------------------------------------------------

PIECES = [b"\r\n", b"\r", b"\n", b" ", b"\t", b":", b",", b"\x00", b"\x80", b"a", b"0"]
PIECES += [b"Host: a", b"Content-Length: ", b"Transfer-Encoding: ", b"chunked", b"5"]
PIECES += [b"GET http://a/ HTTP/1.1", b"CONNECT a:1 HTTP/1.0", b"HTTP/1.1 200 OK", b";x="]
noise = st.lists(st.sampled_from(PIECES) | st.binary(max_size=8), max_size=40).map(b"".join)
START_LINES = [b"GET http://a/ HTTP/1.1", b"CONNECT a:1 HTTP/1.1", b"POST http://a:8/ HTTP/1.0"]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Proxy-Connection"]
VALUES = [b"a", b"0", b"3", b"chunked", b"close", b"keep-alive", b"gzip, chunked", b"1, 1", b""]


def mostly(
    usual: st.SearchStrategy[bytes], other: st.SearchStrategy[bytes]
) -> st.SearchStrategy[bytes]:
    """``usual`` four times in five (``one_of`` leans towards its last branch)."""
    return st.integers(0, 4).flatmap(lambda i: usual if i < 4 else other)


field_line = st.builds(
    lambda name, colon, value: name + colon + value,
    st.sampled_from(NAMES),
    mostly(st.just(b": "), st.sampled_from([b":", b" : "])),
    mostly(st.sampled_from(VALUES), st.binary(max_size=4)),
)
request = st.builds(
    lambda start, fields, end, tail: (
        start + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + end + tail
    ),
    mostly(
        st.sampled_from(START_LINES), st.sampled_from([b"GET / HTTP/1.1", b"OPTIONS * HTTP/1.1"])
    ),
    st.lists(field_line, max_size=4).map(lambda fields: [b"Host: a", *fields]),
    mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b""])),
    mostly(st.sampled_from([b"", b"abc", b"0\r\n\r\n"]), st.binary(max_size=6)),
)
messy = mostly(st.lists(request, max_size=3).map(b"".join), noise)


def read_all(chunks: list[bytes]) -> list[object]:
    """Every head a reader produces for the chunks, then the bytes after the last one
    that is followed by a body or tunnel (or "error"), as a proxy would see them."""
    reader, results = RequestHeadReader(), list[object]()
    rest: bytes | None = None  # once set, every later byte is body or tunnel data
    try:
        for chunk in chunks:
            if rest is not None:
                rest += chunk
                continue
            reader.feed(chunk)
            while (head := reader.next_head()) is not None:
                results.append(head)
                if head.body.has_body or head.is_connect or not head.keep_alive:
                    rest = reader.remainder()
                    break
    except HttpError:
        results.append("error")
    return results if rest is None else [*results, rest]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=500, deadline=None)
@given(messy, st.lists(st.integers(min_value=0), max_size=8))
def test_any_bytes_only_http_errors_and_splits_agree(data: bytes, cuts: list[int]) -> None:
    whole = read_all([data])
    chunked = read_all(split(data, cuts))
    # Only HttpError escapes. A split may fail with another status (it can see a problem
    # earlier) but it accepts and rejects exactly what the whole does.
    assert ("error" in whole) == ("error" in chunked)
    if "error" not in whole:
        assert whole == chunked


hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){0,2}", fullmatch=True)
field_values = st.from_regex(r"[!-~]([ !-~]{0,20}[!-~])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    hosts,
    st.integers(1, 65535),
    st.from_regex(r"(/[a-zA-Z0-9._~%-]{0,8}){1,3}(\?[a-z0-9=&]{0,10})?", fullmatch=True),
    st.lists(st.tuples(st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True), field_values)),
    st.binary(max_size=30),
    st.lists(st.integers(min_value=0), max_size=6),
)
def test_valid_requests_any_split(
    host: str, port: int, path: str, fields: list[tuple[str, str]], body: bytes, cuts: list[int]
) -> None:
    lines = [f"Host: {host}", f"Content-Length: {len(body)}", *(f"{n}: {v}" for n, v in fields)]
    data = get(*lines, target=f"http://{host}:{port}{path}") + body + b"GET"
    whole = read_all([data])
    assert whole == read_all(split(data, cuts))
    head = whole[0]
    assert isinstance(head, RequestHead)
    assert (head.host, head.port, head.path) == (host, port, path)
    assert whole[1:] == ([body + b"GET"] if body else [])
    assert upstream_view(forward_head(head, "egressd")).target == path.encode()


CHUNK_PIECES = [b"5\r\n", b"hello", b"0\r\n", b"\r\n", b";a=b", b'="q"', b"X: y\r\n", b"A"]
chunk = st.builds(
    lambda data, ext, end: b"%x" % len(data) + ext + b"\r\n" + data + end,
    st.binary(max_size=20),
    st.sampled_from([b"", b";a=b", b' ; q="x"', b";", b" "]),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b"x"]),
)
chunk_stream = st.builds(
    lambda chunks, last, trailers, tail: b"".join(chunks) + last + trailers + tail,
    st.lists(chunk, max_size=4),
    st.sampled_from([b"0\r\n", b"000;x=y\r\n", b""]),
    st.sampled_from([b"\r\n", b"T: v\r\n\r\n", b"T : v\r\n\r\n", b""]),
    st.binary(max_size=6),
) | st.lists(st.sampled_from(CHUNK_PIECES) | st.binary(max_size=4), max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(chunk_stream, st.lists(st.integers(min_value=0), max_size=8))
def test_body_tracker_any_bytes_any_split(data: bytes, cuts: list[int]) -> None:
    def run(chunks: list[bytes]) -> tuple[int, bool] | str:
        tracker, used = BodyTracker(CHUNKED), 0
        try:
            for chunk in chunks:
                used += tracker.feed(chunk)
        except HttpError:
            return "error"
        return used, tracker.done

    assert run([data]) == run(split(data, cuts))


@settings(max_examples=200, deadline=None)
@given(messy)
def test_response_reader_any_bytes(data: bytes) -> None:
    for method in ("GET", "HEAD"):
        reader = ResponseHeadReader(method)
        reader.feed(data)
        try:
            while (head := reader.next_head()) is not None and head.is_interim:
                pass
        except HttpError as error:
            assert error.status == 502


def _ipaddress_verdict(host: str) -> str | None:
    """What normalize_host said for a numeric last label before its regex fast path."""
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(host.lower()))
    except ValueError:
        return None


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["0", "1", "9", "00", "01", "10", "25", "255", "256", "300",
                                 "2550", "."]), max_size=9).map("".join))
def test_numeric_hosts_are_judged_as_ipaddress_judges_them(host: str) -> None:
    if host.rstrip(".").rpartition(".")[2].isdigit():  # the last label is numeric
        assert normalize_host(host) == _ipaddress_verdict(host), host


def _fields_line_by_line(section: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    for line in section.split(b"\r\n"):
        name, _, value = line.partition(b":")
        pairs.append((name, value.strip(b" \t")))
    return pairs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"Host", b"X-A", b"content-length", b"Via", b"t"]),
                          st.sampled_from([b"", b" ", b"\t", b"  v", b"v ", b" v w \t", b"a:b",
                                           b"\x80x", b"1"])), min_size=1, max_size=8))
def test_a_field_section_is_read_as_line_by_line(fields: list[tuple[bytes, bytes]]) -> None:
    """The one-pass reading of a section gives the names and OWS-stripped values in order."""
    section = b"\r\n".join(name + b":" + value for name, value in fields)
    reader = RequestHeadReader()
    reader.feed(b"GET http://a/ HTTP/1.1\r\n" + section + b"\r\n\r\n")
    try:
        head = reader.next_head()
    except HttpError:
        return  # e.g. two Host fields or a bad Content-Length: refused, nothing to compare
    assert head is not None
    assert list(head.headers) == _fields_line_by_line(section)


def test_the_longest_valid_authority_parses_and_longer_ones_are_refused() -> None:
    from egressd.protocols.http1 import parse_authority

    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 bytes, the most DNS allows
    longest = name + ".:65535"
    assert len(longest) == 260
    assert parse_authority(longest, default_port=None) == (name + ".", 65535)
    assert parse_authority(name + "e.:65535", default_port=None) is None  # a 254-byte name
    assert parse_authority("[" + "0:" * 200 + ":1]:80", default_port=80) is None


# --- memos: a repeated head is parsed and rewritten once --------------------------------


def test_a_repeated_small_head_is_parsed_once_and_shared() -> None:
    raw = b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\nConnection: x-y\r\nX-Y: 1\r\n\r\n"
    first, again = parse(raw), parse(raw)
    assert again is first  # frozen: sharing it is safe
    assert forward_head(again, "egressd") is forward_head(first, "egressd")
    # The rewrite depends on its arguments too, not only on the head.
    assert forward_head(first, "other") != forward_head(first, "egressd")
    assert forward_head(first, "egressd", connection_close=True).endswith(b"Connection: close\r\n\r\n")
    assert not forward_head(first, "egressd").endswith(b"Connection: close\r\n\r\n")
    assert b"x-y" not in forward_head(first, "egressd").lower()


def test_a_large_head_is_parsed_each_time_and_bad_heads_fail_each_time() -> None:
    large = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n"
    assert parse(large) is not parse(large)
    assert parse(large) == parse(large)
    bad = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nHost: other.example\r\n\r\n"
    assert rejected(bad).reason == rejected(bad).reason == "more than one Host header"


def test_response_heads_are_memoized_per_request_method() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nKeep-Alive: timeout=5\r\n\r\n"

    def response(method: str) -> ResponseHead:
        reader = ResponseHeadReader(method)
        reader.feed(raw)
        head = reader.next_head()
        assert head is not None
        return head

    assert response("GET") is response("GET")
    assert response("GET").body.length == 3
    assert response("HEAD").body is NO_BODY  # the same bytes frame differently after HEAD
    out = forward_response_head(response("GET"), "egressd")
    assert out is forward_response_head(response("GET"), "egressd")
    assert b"keep-alive" not in out.lower() and out.endswith(b"Via: 1.1 egressd\r\n\r\n")
    assert forward_response_head(response("GET"), "egressd", close=True).endswith(b"Connection: close\r\n\r\n")


def test_whole_heads_answer_only_for_the_same_bytes_and_setting() -> None:
    from egressd.protocols.memo import MEMO_ENTRIES, MEMO_HEAD_BYTES, WholeHeads

    memo: WholeHeads[str] = WholeHeads()
    setting = object()
    memo.put(b"GET / HTTP/1.1\r\n\r\n", setting, "head")
    assert memo.get(b"GET / HTTP/1.1\r\n\r\n", setting) == "head"
    assert memo.get(b"GET / HTTP/1.1\r\n\r\n", object()) is None  # other limits: read again
    assert memo.get(b"GET /x HTTP/1.1\r\n\r\n", setting) is None
    memo.put(b"r", "GET", "response")
    assert memo.get(b"r", "GET") == "response" and memo.get(b"r", "HEAD") is None  # equal settings match
    memo.put(b"x" * (MEMO_HEAD_BYTES + 1), setting, "large")
    assert memo.get(b"x" * (MEMO_HEAD_BYTES + 1), setting) is None  # not kept
    for n in range(MEMO_ENTRIES + 1):  # bounded: emptied when full
        memo.put(str(n).encode(), setting, "n")
    assert len(memo) <= MEMO_ENTRIES
