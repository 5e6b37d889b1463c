"""Properties every sans-I/O codec keeps, whatever the bytes (issue 9, item 5).

For each codec: what it builds, it parses back (round trip); arbitrary input in any
chunking gives a result or the codec's own error type, never another exception; and
feeding byte by byte gives what feeding at once gives. The codecs' own test files hold
the hand-picked cases; `fuzz/` runs the same properties under atheris for millions of
inputs, and `test_fuzz_corpus.py` replays what it kept.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from egressd.protocols.geofeed import (
    GeofeedEntry,
    GeofeedError,
    GeofeedIndex,
    format_geofeed,
    parse_geofeed,
)
from egressd.protocols.http1 import (
    CHUNKED,
    BodyFraming,
    BodyTracker,
    HttpError,
    RequestHead,
    RequestHeadReader,
    ResponseHeadReader,
    forward_head,
    forward_response_head,
    simple_response,
)
from egressd.protocols.proxy_v2 import (
    SIGNATURE,
    ProxyV2Error,
    ProxyV2Header,
    ProxyV2Reader,
    encode_proxy_v2,
    parse_proxy_v2,
)
from egressd.protocols.socks5 import (
    AddressType,
    Command,
    CredentialsReceived,
    Method,
    MethodSelected,
    ReplyCode,
    RequestReceived,
    build_udp_datagram,
    parse_udp_datagram,
)

from . import test_http1, test_socks5

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cuts = st.lists(st.integers(min_value=0), max_size=8)


def split(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- shared generators -----------------------------------------------------------------

hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9]{1,5}){0,2}", fullmatch=True)
ipv4s = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6s = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
tokens = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True)
field_names = st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True)
field_values = st.from_regex(r"[!-~\x80-\xff]([ \t!-~\x80-\xff]{0,20}[!-~\x80-\xff])?", fullmatch=True)
fields = st.lists(st.tuples(field_names, field_values), max_size=6)


def lines(*items: str) -> bytes:
    return ("\r\n".join(items) + "\r\n\r\n").encode("latin-1")


# --- HTTP/1.1 request heads ------------------------------------------------------------


@SETTINGS
@given(test_http1.messy)
def test_request_reader_byte_by_byte_equals_at_once(data: bytes) -> None:
    """Only HttpError escapes; one byte at a time gives the same heads and the same bytes
    after them (or fails too: it may see a problem earlier, with another status)."""
    whole = test_http1.read_all([data])
    one_by_one = test_http1.read_all(bytewise(data))
    assert ("error" in whole) == ("error" in one_by_one)
    if "error" not in whole:
        assert whole == one_by_one


methods = (st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
           | tokens.filter(lambda method: method != "CONNECT"))
paths = st.from_regex(r"(/[A-Za-z0-9._~%!$&'()*+,;=:@-]{0,8}){1,3}(\?[A-Za-z0-9=&/?]{0,10})?", fullmatch=True)
framings = st.sampled_from(["none", "length", "chunked"])


@SETTINGS
@given(methods, hosts | ipv4s, st.integers(1, 65535), paths, fields, framings, st.booleans(), cuts)
def test_request_forward_round_trip(
    method: str, host: str, port: int, path: str, extra: list[tuple[str, str]], framing: str,
    http10: bool, points: list[int],
) -> None:
    """A request parsed, forwarded with forward_head, and parsed again (as the upstream
    would) keeps its method, path, fields and framing; Host becomes the target's authority."""
    framing_fields = {"none": [], "length": ["Content-Length: 7"],
                      "chunked": ["Transfer-Encoding: chunked"]}[framing]
    if http10 and framing == "chunked":
        framing_fields = []
    version = "HTTP/1.0" if http10 else "HTTP/1.1"
    raw = lines(f"{method} http://{host}:{port}{path} {version}", f"Host: {host}",
                *framing_fields, *(f"{name}: {value}" for name, value in extra),
                "Connection: keep-alive, Hop-Only", "Hop-Only: dropped",
                "Proxy-Authorization: Basic eDp5")
    head = next_head(split(raw, points))
    assert (head.method, head.host, head.port, head.path) == (method, host, port, path)
    forwarded = forward_head(head, "egressd")
    again = next_head([forwarded])
    assert again.is_origin_form and (again.method, again.path) == (method, path)
    assert again.header("Host") == head.authority.encode()
    assert [pair for pair in again.headers if pair[0].startswith(b"X-")] == [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in extra]
    assert again.header("Via") == f"{version[5:]} egressd".encode()
    assert again.body == head.body
    assert again.proxy_credentials is None and again.header("Hop-Only") is None


def next_head(chunks: list[bytes]) -> RequestHead:
    reader = RequestHeadReader()
    for chunk in chunks:
        reader.feed(chunk)
    head = reader.next_head()
    assert head is not None
    return head


# --- HTTP/1.1 response heads -----------------------------------------------------------


def response_verdict(chunks: list[bytes], method: str) -> list[object]:
    """The heads a response reader returns for the chunks (1xx first, then the final
    one), followed by "error" if it failed (with status 502, nothing else)."""
    reader = ResponseHeadReader(method)
    results: list[object] = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (head := reader.next_head()) is not None:
                results.append(head)
                if not head.is_interim:
                    return results
    except HttpError as error:
        assert error.status == 502
        return [*results, "error"]
    return results


@SETTINGS
@given(test_http1.messy, cuts, st.sampled_from(["GET", "HEAD", "CONNECT"]))
def test_response_reader_any_bytes_any_split(data: bytes, points: list[int], method: str) -> None:
    whole = response_verdict([data], method)
    for chunks in (split(data, points), bytewise(data)):
        chunked = response_verdict(chunks, method)
        assert ("error" in whole) == ("error" in chunked)
        if "error" not in whole:
            assert chunked == whole


reasons = st.from_regex(r"[A-Za-z][ A-Za-z0-9\x80-\xff]{0,20}", fullmatch=True)


@SETTINGS
@given(st.integers(100, 599).filter(lambda s: s != 101), reasons, fields,
       st.sampled_from(["length", "chunked", "close"]), st.sampled_from(["GET", "HEAD"]), cuts)
def test_response_forward_round_trip(
    status: int, reason: str, extra: list[tuple[str, str]], framing: str, method: str,
    points: list[int],
) -> None:
    framing_field = {"length": ["Content-Length: 12"], "chunked": ["Transfer-Encoding: chunked"],
                     "close": []}[framing]
    raw = lines(f"HTTP/1.1 {status} {reason}", *framing_field,
                *(f"{name}: {value}" for name, value in extra), "Connection: X-Hop", "X-Hop: 1")
    reader = ResponseHeadReader(method)
    for chunk in split(raw, points):
        reader.feed(chunk)
    head = reader.next_head()
    assert head is not None and (head.status, head.reason) == (status, reason)
    again_reader = ResponseHeadReader(method)
    again_reader.feed(forward_response_head(head, "egressd"))
    again = again_reader.next_head()
    assert again is not None
    assert (again.status, again.reason, again.body) == (status, reason, head.body)
    assert [pair for pair in again.headers if pair[0].startswith(b"X-")] == [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in extra]


@SETTINGS
@given(st.integers(200, 599).filter(lambda s: s not in (204, 304)), reasons,
       st.binary(max_size=64), st.booleans())
def test_simple_response_round_trip(status: int, reason: str, body: bytes, close: bool) -> None:
    data = simple_response(status, reason, body, (("Content-Type", "text/plain"),), close)
    reader = ResponseHeadReader("GET")
    reader.feed(data)
    head = reader.next_head()
    assert head is not None and (head.status, head.reason) == (status, reason)
    assert head.body == BodyFraming.content_length(len(body)) and head.keep_alive is not close
    tracker = BodyTracker(head.body)
    rest = reader.remainder()
    assert tracker.feed(rest + b"next") == len(body) and tracker.done
    assert rest == body


# --- HTTP/1.1 bodies -------------------------------------------------------------------

extensions = st.sampled_from([b"", b";a=b", b' ; q="x y"', b";name", b"\t;a=\"\\\"\""])
trailers = st.lists(st.tuples(field_names, field_values), max_size=3).map(
    lambda pairs: b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in pairs))


def encode_chunked(chunks: list[bytes], extension: bytes, trailer: bytes, upper: bool) -> bytes:
    out = b"".join((b"%X" if upper else b"%x") % len(chunk) + extension + b"\r\n" + chunk + b"\r\n"
                   for chunk in chunks if chunk)
    return out + b"0" + extension + b"\r\n" + trailer + b"\r\n"


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=5), extensions, trailers,
       st.booleans(), st.binary(max_size=10), cuts)
def test_chunked_round_trip_any_split(
    chunks: list[bytes], extension: bytes, trailer: bytes, upper: bool, tail: bytes,
    points: list[int],
) -> None:
    """A well-formed chunked body is taken exactly: not a byte of what follows it."""
    encoded = encode_chunked(chunks, extension, trailer, upper)
    for pieces in (split(encoded + tail, points), bytewise(encoded + tail)):
        tracker, taken = BodyTracker(CHUNKED), 0
        for piece in pieces:
            taken += tracker.feed(piece)
        assert tracker.done and taken == len(encoded)


@SETTINGS
@given(st.integers(0, 200), st.binary(max_size=300), cuts)
def test_content_length_any_split(length: int, data: bytes, points: list[int]) -> None:
    tracker, taken = BodyTracker(BodyFraming.content_length(length)), 0
    for piece in split(data, points):
        taken += tracker.feed(piece)
    assert taken == min(length, len(data))
    assert tracker.done is (len(data) >= length)


@SETTINGS
@given(test_http1.chunk_stream)
def test_chunked_any_bytes_byte_by_byte(data: bytes) -> None:
    def run(pieces: list[bytes]) -> tuple[int, bool] | str:
        tracker, taken = BodyTracker(CHUNKED), 0
        try:
            for piece in pieces:
                taken += tracker.feed(piece)
        except HttpError as error:
            assert error.status == 400
            return "error"
        return taken, tracker.done

    assert run([data]) == run(bytewise(data))


# --- SOCKS5 ----------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20).filter(
    lambda text: len(text.encode()) <= 255)
destinations = st.one_of(
    ipv4s.map(lambda host: (host, AddressType.IPV4)),
    ipv6s.map(lambda host: (host, AddressType.IPV6)),
    hosts.filter(lambda host: not host.replace(".", "").isdigit()).map(lambda host: (host, AddressType.DOMAIN)),
)


def socks_address(host: str, address_type: AddressType) -> bytes:
    if address_type is AddressType.DOMAIN:
        return bytes([3, len(host)]) + host.encode()
    return bytes([address_type]) + ipaddress.ip_address(host).packed


@SETTINGS
@given(st.lists(st.integers(0, 255), max_size=10), names, names, destinations,
       st.integers(1, 65535), st.sampled_from([Command.CONNECT, Command.UDP_ASSOCIATE]), cuts)
def test_socks5_client_dialogue_round_trip(
    other_methods: list[int], username: str, password: str, destination: tuple[str, AddressType],
    port: int, command: Command, points: list[int],
) -> None:
    """What a client encodes, the server reads back: method, credentials, request."""
    methods = bytes([*other_methods, Method.USERNAME_PASSWORD])
    user, secret = username.encode(), password.encode()
    host, address_type = destination
    data = (bytes([5, len(methods)]) + methods + bytes([1, len(user)]) + user
            + bytes([len(secret)]) + secret
            + bytes([5, command, 0]) + socks_address(host, address_type) + struct.pack("!H", port))
    for chunks in (split(data, points), bytewise(data)):
        events, sent, _state, rest = test_socks5.drive(chunks)
        assert events == [MethodSelected(Method.USERNAME_PASSWORD), CredentialsReceived(username, password),
                          RequestReceived(command, host, port, address_type)]
        assert sent[:4] == b"\x05\x02\x01\x00" and rest == b""


@SETTINGS
@given(test_socks5.dialogues)
def test_socks5_any_bytes_byte_by_byte(data: bytes) -> None:
    assert test_socks5.drive([data]) == test_socks5.drive(bytewise(data))


def decode_reply(data: bytes) -> tuple[int, str, int]:
    """A client's reading of a reply (RFC 1928 §6)."""
    assert data[0] == 5 and data[2] == 0
    atyp = data[3]
    if atyp == 1:
        host, end = str(ipaddress.IPv4Address(data[4:8])), 8
    elif atyp == 4:
        host, end = str(ipaddress.IPv6Address(data[4:20])), 20
    else:
        host, end = data[5 : 5 + data[4]].decode(), 5 + data[4]
    (port,) = struct.unpack("!H", data[end : end + 2])
    assert len(data) == end + 2
    return data[1], host, port


@SETTINGS
@given(st.sampled_from(list(ReplyCode)), destinations, st.integers(0, 65535))
def test_socks5_reply_round_trip(code: ReplyCode, bound: tuple[str, AddressType], port: int) -> None:
    server = test_socks5.authenticated()
    server.receive_data(bytes([5, 1, 0]) + socks_address("192.0.2.1", AddressType.IPV4) + b"\x00\x50")
    assert decode_reply(server.reply(code, bound[0], port)) == (code, bound[0], port)


@SETTINGS
@given(destinations, st.integers(1, 65535), st.binary(max_size=64), st.integers(0, 255))
def test_udp_datagram_round_trip(destination: tuple[str, AddressType], port: int, payload: bytes,
                                 frag: int) -> None:
    host, address_type = destination
    datagram = parse_udp_datagram(build_udp_datagram(host, port, payload, frag=frag))
    assert (datagram.host, datagram.port, datagram.address_type) == (host, port, address_type)
    assert (datagram.payload, datagram.frag) == (payload, frag)


# --- PROXY protocol v2 -----------------------------------------------------------------

proxy_noise = st.one_of(
    st.binary(max_size=60),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 300), st.binary(max_size=60)).map(
        lambda parts: SIGNATURE + bytes([parts[0], parts[1]]) + struct.pack("!H", parts[2]) + parts[3]),
    st.tuples(st.sampled_from([0x20, 0x21]), st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31]),
              st.binary(max_size=120)).map(
        lambda parts: SIGNATURE + bytes(parts[:2]) + struct.pack("!H", len(parts[2])) + parts[2]),
)


def proxy_verdict(chunks: list[bytes]) -> ProxyV2Header | str | None:
    reader = ProxyV2Reader()
    try:
        for chunk in chunks:
            header = reader.feed(chunk)
            if header is not None:
                return header
    except ProxyV2Error:
        return "error"
    return None


@SETTINGS
@given(proxy_noise, cuts)
def test_proxy_v2_any_bytes_any_split(data: bytes, points: list[int]) -> None:
    """Only ProxyV2Error escapes, and the reader in any chunking agrees with one parse."""
    try:
        whole: ProxyV2Header | str | None = parse_proxy_v2(data)
    except ProxyV2Error:
        whole = "error"
    assert proxy_verdict(split(data, points)) == whole
    assert proxy_verdict(bytewise(data)) == whole


@SETTINGS
@given(st.sampled_from([(ipv4s, "198.51.100.1"), (ipv6s, "2001:db8::1")]).flatmap(
    lambda pair: st.tuples(pair[0], st.just(pair[1]))), st.integers(0, 65535), st.integers(0, 65535),
       st.lists(st.tuples(st.integers(0xE0, 0xEF), st.binary(max_size=20)), max_size=3),
       st.booleans(), cuts)
def test_proxy_v2_round_trip_any_split(
    addresses: tuple[str, str], source_port: int, destination_port: int,
    tlvs: list[tuple[int, bytes]], checksum: bool, points: list[int],
) -> None:
    source, destination = addresses
    assume(ipaddress.ip_address(source).version == 4
           or ipaddress.IPv6Address(source).ipv4_mapped is None)
    data = encode_proxy_v2((source, source_port), (destination, destination_port), tlvs=tlvs,
                           checksum=checksum)
    header = proxy_verdict(split(data + b"payload", points))
    assert isinstance(header, ProxyV2Header) and header.consumed == len(data)
    assert header.source == (source, source_port) and list(header.tlvs[: len(tlvs)]) == tlvs


# --- geofeed ---------------------------------------------------------------------------

cities = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]),
                 max_size=20).map(str.strip)
regions = st.from_regex(r"[A-Z0-9]{1,3}", fullmatch=True)


@st.composite
def geofeed_entries(draw: st.DrawFn) -> GeofeedEntry:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    length = draw(st.integers(0, bits))
    value = draw(st.integers(0, 2**bits - 1)) >> (bits - length) << (bits - length)
    network = ipaddress.ip_network((value, length))
    country = draw(st.sampled_from(["", "US", "FR", "JP"]))
    region = f"{country}-{draw(regions)}" if country and draw(st.booleans()) else ""
    return GeofeedEntry(network, country, region, draw(cities), draw(cities))


@SETTINGS
@given(st.lists(geofeed_entries(), max_size=8, unique_by=lambda entry: entry.prefix), st.booleans())
def test_geofeed_round_trip(entries: list[GeofeedEntry], crlf: bool) -> None:
    text = format_geofeed(entries)
    assert parse_geofeed(text.replace("\n", "\r\n") if crlf else text) == entries
    index = GeofeedIndex(entries)
    for entry in entries:  # longest-prefix match agrees with a linear scan
        address = entry.prefix.network_address
        holding = [e for e in entries if address in e.prefix]
        assert index.lookup(address) == max(holding, key=lambda e: e.prefix.prefixlen)


GEOFEED_PIECES = ["192.0.2.0/24", "2001:db8::/32", ",", "US", "US-CA", "\n", "\r\n", "#", '"',
                  " ", "\u2028", "\x85", "\x00", "é", "10.0.0.1/8", "::/0", "a,b", "%eth0", "2::",
                  "/255.255.255.0", "/128"]
geofeed_noise = st.one_of(st.text(max_size=60),
                          st.lists(st.sampled_from(GEOFEED_PIECES), max_size=30).map("".join))


@SETTINGS
@given(geofeed_noise)
def test_geofeed_any_text_parses_or_raises_geofeed_error(text: str) -> None:
    try:
        entries = parse_geofeed(text)
    except GeofeedError:
        return
    assert parse_geofeed(format_geofeed(entries)) == entries  # what it accepts, it can write


@SETTINGS
@given(st.text(max_size=30), st.text(max_size=10))
def test_geofeed_any_city_is_refused_or_written_as_one_line(city: str, postal: str) -> None:
    try:
        entry = GeofeedEntry(ipaddress.ip_network("192.0.2.0/24"), "US", "US-CA", city, postal)
    except ValueError:
        return
    assert parse_geofeed(format_geofeed([entry], header="")) == [entry]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x1c", "\x0b"])
def test_a_city_cannot_add_a_feed_line(separator: str) -> None:
    """A line separator in a city would be a second feed line for a splitlines() reader:
    refused when built, and an error (not an extra prefix) when read."""
    injected = f"X{separator}198.51.100.0/24,US,US-NY,Elsewhere"
    with pytest.raises(ValueError, match="control character or line separator"):
        GeofeedEntry(ipaddress.ip_network("192.0.2.0/24"), "US", "US-CA", injected)
    with pytest.raises(GeofeedError):
        parse_geofeed(f"192.0.2.0/24,US,US-CA,{injected}\n")
