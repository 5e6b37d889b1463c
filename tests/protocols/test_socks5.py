"""The SOCKS5 server state machine (RFC 1928 + RFC 1929) and the UDP datagram header."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.protocols.socks5 import (
    AddressType,
    Command,
    CredentialsReceived,
    Event,
    Method,
    MethodSelected,
    ProtocolError,
    ProtocolFailure,
    ReplyCode,
    RequestReceived,
    Socks5Server,
    Socks5State,
    Socks5StateError,
    UdpDatagram,
    build_udp_datagram,
    parse_udp_datagram,
)

GREETING = b"\x05\x02\x00\x02"  # offers no-auth and username/password
AUTH = b"\x01\x05alice\x06s3cret"


def request(
    command: int = 1, atyp: int = 3, address: bytes = b"\x0bexample.com", port: int = 443
) -> bytes:
    return bytes([5, command, 0, atyp]) + address + struct.pack("!H", port)


def failure_reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def state(server: Socks5Server) -> Socks5State:
    """The state, read through a call so that type checkers do not narrow it across steps."""
    return server.state


def authenticated() -> Socks5Server:
    server = Socks5Server()
    server.receive_data(GREETING + AUTH)
    server.accept_credentials()
    server.data_to_send()
    return server


def test_full_dialogue_byte_by_byte() -> None:
    server = Socks5Server()
    events: list[Event] = []
    sent = b""
    for byte in GREETING + AUTH:
        events += server.receive_data(bytes([byte]))
        sent += server.data_to_send()
    assert events == [
        MethodSelected(Method.USERNAME_PASSWORD),
        CredentialsReceived("alice", "s3cret"),
    ]
    assert sent == b"\x05\x02"
    assert state(server) is Socks5State.AUTH_DECISION
    assert server.accept_credentials() == b"\x01\x00"
    for byte in request(address=b"\x0bExample.COM") + b"\x16\x03":
        events += server.receive_data(bytes([byte]))
    assert events[-1] == RequestReceived(Command.CONNECT, "example.com", 443, AddressType.DOMAIN)
    assert state(server) is Socks5State.AWAITING_REPLY
    assert server.reply(ReplyCode.SUCCEEDED, "192.0.2.10", 40000) == (
        b"\x05\x00\x00\x01\xc0\x00\x02\x0a\x9c\x40"
    )
    assert state(server) is Socks5State.DONE
    assert server.remainder() == b"\x16\x03"
    assert server.data_to_send() == b""


def test_pipelined_client_is_parsed_after_each_decision() -> None:
    server = Socks5Server()
    events = server.receive_data(GREETING + AUTH + request() + b"early tunnel bytes")
    assert [type(e) for e in events] == [MethodSelected, CredentialsReceived]
    assert server.data_to_send() == b"\x05\x02"
    server.accept_credentials()
    assert server.receive_data(b"") == [
        RequestReceived(Command.CONNECT, "example.com", 443, AddressType.DOMAIN)
    ]
    server.reply(ReplyCode.SUCCEEDED)
    assert server.remainder() == b"early tunnel bytes"


@pytest.mark.parametrize(
    "atyp, address, host, address_type",
    [
        (1, bytes([203, 0, 113, 5]), "203.0.113.5", AddressType.IPV4),
        (4, bytes.fromhex("20010db8000000000000000000000001"), "2001:db8::1", AddressType.IPV6),
        (3, b"\x0bEXAMPLE.com", "example.com", AddressType.DOMAIN),
        (3, b"\x0b2001:DB8::1", "2001:db8::1", AddressType.DOMAIN),
        (3, b"\x0910.0.0.1.", None, None),  # a numeric last label must be a dotted quad
        (3, b"\x07my_host", "my_host", AddressType.DOMAIN),
    ],
)
def test_request_addresses(
    atyp: int, address: bytes, host: str | None, address_type: AddressType | None
) -> None:
    server = authenticated()
    events = server.receive_data(request(atyp=atyp, address=address, port=8443))
    if host is None:
        assert events == [ProtocolFailure(ReplyCode.GENERAL_FAILURE, "invalid domain name")]
    else:
        assert events == [RequestReceived(Command.CONNECT, host, 8443, address_type)]  # type: ignore[arg-type]


def test_udp_associate_with_zero_address_and_port() -> None:
    server = authenticated()
    events = server.receive_data(request(command=3, atyp=1, address=b"\0\0\0\0", port=0))
    assert events == [RequestReceived(Command.UDP_ASSOCIATE, "0.0.0.0", 0, AddressType.IPV4)]
    reply = server.reply(ReplyCode.SUCCEEDED, "2001:db8::53", 5353)
    assert (
        reply
        == b"\x05\x00\x00\x04" + bytes.fromhex("20010db8000000000000000000000053") + b"\x14\xe9"
    )


# --- failures ----------------------------------------------------------------------------

# (bytes sent from the start of the dialogue, expected reply code, expected bytes sent)
FAILURES = {
    "socks4 client": (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", None, b""),
    "http client": (b"GET / HTTP/1.1\r\n", None, b""),
    "no methods": (b"\x05\x00", None, b"\x05\xff"),
    "no-auth only": (b"\x05\x01\x00", None, b"\x05\xff"),
    "gssapi only": (b"\x05\x02\x01\x80", None, b"\x05\xff"),
    "auth version 5": (GREETING + b"\x05\x05alice\x06s3cret", None, b"\x05\x02"),
    "empty username": (GREETING + b"\x01\x00\x06s3cret", None, b"\x05\x02\x01\x01"),
    "empty password": (GREETING + b"\x01\x05alice\x00", None, b"\x05\x02\x01\x01"),
    "non-utf-8 username": (GREETING + b"\x01\x02\xff\xfe\x01p", None, b"\x05\x02\x01\x01"),
}
REQUEST_FAILURES = {
    "request version 4": (b"\x04\x01\x00\x01", None),
    "bind": (request(command=2), ReplyCode.COMMAND_NOT_SUPPORTED),
    "unknown command": (request(command=9), ReplyCode.COMMAND_NOT_SUPPORTED),
    "reserved byte": (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", ReplyCode.GENERAL_FAILURE),
    "address type 2": (request(atyp=2), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
    "address type 0xff": (request(atyp=255), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
    "empty domain": (request(address=b"\x00"), ReplyCode.GENERAL_FAILURE),
    "nul in domain": (request(address=b"\x03a\x00b"), ReplyCode.GENERAL_FAILURE),
    "space in domain": (request(address=b"\x03a b"), ReplyCode.GENERAL_FAILURE),
    "non-ascii domain": (request(address=b"\x02\xc3\xa9"), ReplyCode.GENERAL_FAILURE),
    "hex ipv4 domain": (request(address=b"\x060x7f.1"), ReplyCode.GENERAL_FAILURE),
    "bad ipv6 text": (request(address=b"\x05::g::"), ReplyCode.GENERAL_FAILURE),
    "ipv6 zone in domain": (request(address=b"\x0afe80::1%25"), ReplyCode.GENERAL_FAILURE),
    "mapped ipv6 zone in domain": (request(address=b"\x12::ffff:127.0.0.1%1"), ReplyCode.GENERAL_FAILURE),
    "ipv6 zone and nul": (request(address=b"\x06::1%\x00x"), ReplyCode.GENERAL_FAILURE),
    "connect port 0": (request(port=0), ReplyCode.GENERAL_FAILURE),
}


@pytest.mark.parametrize("data, code, sent", FAILURES.values(), ids=FAILURES.keys())
def test_greeting_and_auth_failures(data: bytes, code: ReplyCode | None, sent: bytes) -> None:
    for chunks in ([data], [bytes([b]) for b in data]):
        server = Socks5Server()
        events: list[Event] = []
        out = b""
        for chunk in chunks:
            events += server.receive_data(chunk)
            out += server.data_to_send()
        assert len(events) >= 1 and isinstance(events[-1], ProtocolFailure)
        assert events[-1].reply_code is code
        assert out == sent
        assert state(server) is Socks5State.FAILED
        assert server.receive_data(b"\x05\x01\x00") == []  # a failed machine ignores input


@pytest.mark.parametrize("data, code", REQUEST_FAILURES.values(), ids=REQUEST_FAILURES.keys())
def test_request_failures(data: bytes, code: ReplyCode | None) -> None:
    for chunks in ([data], [bytes([b]) for b in data]):
        server = authenticated()
        events: list[Event] = []
        for chunk in chunks:
            events += server.receive_data(chunk)
        assert len(events) == 1 and isinstance(events[0], ProtocolFailure)
        assert events[0].reply_code is code
        assert server.data_to_send() == (b"" if code is None else failure_reply(code))
        assert state(server) is Socks5State.FAILED


def test_failure_is_reported_without_waiting_for_the_rest() -> None:
    server = Socks5Server()
    assert isinstance(server.receive_data(b"\x04")[0], ProtocolFailure)
    server = authenticated()
    assert server.receive_data(b"\x05\x02")[0] == ProtocolFailure(
        ReplyCode.COMMAND_NOT_SUPPORTED, "command 2 not supported"
    )


def test_rejected_credentials() -> None:
    server = Socks5Server()
    server.receive_data(GREETING + AUTH + request())
    assert server.reject_credentials() == b"\x01\x01"
    assert state(server) is Socks5State.FAILED
    assert server.receive_data(b"") == []


def test_failure_reply_from_the_caller() -> None:
    server = authenticated()
    server.receive_data(request())
    assert server.reply(ReplyCode.HOST_UNREACHABLE) == failure_reply(4)
    assert state(server) is Socks5State.FAILED


def test_no_auth_only_when_allowed() -> None:
    server = Socks5Server(allow_no_auth=True)
    assert server.receive_data(b"\x05\x01\x00") == [MethodSelected(Method.NO_AUTH)]
    assert server.data_to_send() == b"\x05\x00"
    assert state(server) is Socks5State.REQUEST
    server = Socks5Server(allow_no_auth=True)  # username/password is still preferred
    assert server.receive_data(GREETING) == [MethodSelected(Method.USERNAME_PASSWORD)]


@pytest.mark.parametrize(
    "setup, call",
    [
        (lambda s: None, lambda s: s.accept_credentials()),
        (lambda s: None, lambda s: s.reject_credentials()),
        (lambda s: None, lambda s: s.reply(ReplyCode.SUCCEEDED)),
        (lambda s: None, lambda s: s.remainder()),
        (lambda s: s.receive_data(GREETING + AUTH), lambda s: s.reply(ReplyCode.SUCCEEDED)),
        (lambda s: s.receive_data(GREETING + AUTH), lambda s: s.remainder()),
        (
            lambda s: (s.receive_data(GREETING + AUTH), s.accept_credentials()),
            lambda s: s.accept_credentials(),
        ),
        (
            lambda s: (
                s.receive_data(GREETING + AUTH),
                s.accept_credentials(),
                s.receive_data(request()),
                s.reply(ReplyCode.SUCCEEDED),
            ),
            lambda s: s.receive_data(b"tunnel"),
        ),
    ],
)
def test_misuse_raises_state_error(setup: object, call: object) -> None:
    server = Socks5Server()
    setup(server)  # type: ignore[operator]
    with pytest.raises(Socks5StateError):
        call(server)  # type: ignore[operator]


def test_buffer_bound_while_the_caller_decides() -> None:
    server = Socks5Server(max_buffer=16)
    server.receive_data(GREETING + AUTH)
    events = server.receive_data(b"x" * 17)
    assert events == [ProtocolFailure(None, "too much data before the reply")]
    assert state(server) is Socks5State.FAILED


def test_credentials_repr_hides_password() -> None:
    assert "s3cret" not in repr(CredentialsReceived("alice", "s3cret"))


def test_reply_encodings_and_bad_arguments() -> None:
    server = authenticated()
    server.receive_data(request())
    with pytest.raises(ValueError):
        server.reply(ReplyCode.SUCCEEDED, "192.0.2.1", 70000)
    assert state(server) is Socks5State.AWAITING_REPLY  # nothing changed
    assert (
        server.reply(ReplyCode.SUCCEEDED, "pop.example", 1)
        == b"\x05\x00\x00\x03\x0bpop.example\x00\x01"
    )


# --- UDP -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, port, address_type",
    [
        ("198.51.100.7", 53, AddressType.IPV4),
        ("2001:db8::7", 443, AddressType.IPV6),
        ("dns.example", 853, AddressType.DOMAIN),
    ],
)
@pytest.mark.parametrize("payload", [b"", b"\x00" * 3, b"quic" * 300])
def test_udp_round_trip(host: str, port: int, address_type: AddressType, payload: bytes) -> None:
    datagram = build_udp_datagram(host, port, payload)
    assert parse_udp_datagram(datagram) == UdpDatagram(0, host, port, address_type, payload)
    assert not parse_udp_datagram(datagram).is_fragment


def test_udp_fragments_are_reported() -> None:
    datagram = parse_udp_datagram(build_udp_datagram("192.0.2.1", 53, b"part", frag=0x81))
    assert datagram.frag == 0x81 and datagram.is_fragment


def test_udp_wire_format() -> None:
    assert build_udp_datagram("192.0.2.1", 53, b"q") == b"\x00\x00\x00\x01\xc0\x00\x02\x01\x00\x35q"


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01\x00\x01\xc0\x00\x02\x01\x00\x35",  # RSV
        b"\x01\x00\x00\x01\xc0\x00\x02\x01\x00\x35",  # RSV
        b"\x00\x00\x00\x02\xc0\x00\x02\x01\x00\x35",  # ATYP
        b"\x00\x00\x00\x03\x00\x00\x35",  # empty domain
        b"\x00\x00\x00\x03\x03a\x00b\x00\x35",  # NUL in domain
        b"\x00\x00\x00\x01\xc0\x00\x02\x01\x00\x00",  # port 0
    ],
)
def test_bad_udp_headers(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_udp_datagram(data)


def test_every_truncation_of_a_udp_header_is_an_error() -> None:
    for host in ("192.0.2.1", "2001:db8::1", "a.example"):
        header = build_udp_datagram(host, 1, b"")
        for length in range(len(header)):
            with pytest.raises(ProtocolError):
                parse_udp_datagram(header[:length])


def test_build_udp_refuses_bad_arguments() -> None:
    calls: list[Callable[[], bytes]] = [
        lambda: build_udp_datagram("a", 65536, b""),
        lambda: build_udp_datagram("a" * 256, 1, b""),
        lambda: build_udp_datagram("é.example", 1, b""),
        lambda: build_udp_datagram("a", 1, b"", frag=256),
    ]
    for call in calls:
        with pytest.raises((ValueError, UnicodeError)):
            call()


# --- properties ------------------------------------------------------------------------

V6 = bytes.fromhex("20010db8000000000000000000000001")
BAD_GREETINGS = [b"\x05\x01\x02", b"\x05\x01\x00", b"\x04\x01", b"\x05\x00"]
BAD_AUTHS = [b"\x01\x01u\x01p", b"\x01\x00", b"\x02\x01u\x01p", b"\x01\x01\xff\x01p"]
REQUESTS = [request(), request(3, 1, b"\0\0\0\0", 0), request(atyp=4, address=V6)]
BAD_REQUESTS = [request(command=2), request(atyp=2), request(port=0), request(address=b"\x00")]


def part(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    """Mostly a valid message, sometimes an invalid one or noise."""
    choices = [st.sampled_from(good)] * 7 + [st.sampled_from(bad)] * 2 + [st.binary(max_size=4)]
    return st.integers(0, 9).flatmap(lambda i: choices[i])


dialogues = st.builds(
    lambda *parts: b"".join(parts),
    part([GREETING], BAD_GREETINGS),
    part([AUTH], BAD_AUTHS),
    part(REQUESTS, BAD_REQUESTS),
    st.binary(max_size=6),
)


def drive(chunks: list[bytes]) -> tuple[list[Event], bytes, Socks5State, bytes]:
    """Run a dialogue, accepting credentials and replying success, as a PoP would."""
    server = Socks5Server()
    events: list[Event] = []
    sent = b""
    pending = list(chunks)
    while pending:
        new = server.receive_data(pending.pop(0))
        sent += server.data_to_send()
        while new:
            events += new
            last, new = new[-1], []
            if isinstance(last, CredentialsReceived):
                sent += server.accept_credentials()
                new = server.receive_data(b"")
                sent += server.data_to_send()
            elif isinstance(last, RequestReceived):
                sent += server.reply(ReplyCode.SUCCEEDED, "192.0.2.1", 1)
                return events, sent, server.state, server.remainder() + b"".join(pending)
    return events, sent, server.state, b""


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=400, deadline=None)
@given(dialogues, st.lists(st.integers(min_value=0), max_size=8))
def test_any_bytes_never_raise_and_splits_agree(data: bytes, cuts: list[int]) -> None:
    assert drive([data]) == drive(split(data, cuts))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.sampled_from([b"\0\0\0\x03", b"\0\0\0\x01", b"\0\0\0\x04"]))
def test_udp_parser_raises_only_protocol_error(data: bytes) -> None:
    try:
        datagram = parse_udp_datagram(data)
    except ProtocolError:
        return
    assert build_udp_datagram(datagram.host, datagram.port, datagram.payload, frag=datagram.frag)


# --- remembered messages: a device repeats its dialogue --------------------------------


@pytest.fixture
def fresh_memo(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """An empty message memo, and how often each parser ran."""
    from egressd.protocols import socks5
    from egressd.protocols.memo import WholeHeads

    monkeypatch.setattr(socks5, "_KNOWN_MESSAGES", WholeHeads())
    counts = {"greeting": 0, "auth": 0, "request": 0}
    for name in counts:
        original = getattr(Socks5Server, f"_parse_{name}")

        def counting(self: Socks5Server, _original: Callable[..., object] = original, _name: str = name) -> object:
            counts[_name] += 1
            return _original(self)

        monkeypatch.setattr(Socks5Server, f"_parse_{name}", counting)
    return counts


def _dialogue(server: Socks5Server, reply_host: str = "192.0.2.1") -> tuple[list[Event], bytes, Socks5State]:
    events = server.receive_data(GREETING)
    out = server.data_to_send()
    events += server.receive_data(AUTH)
    out += server.data_to_send() + server.accept_credentials()
    events += server.receive_data(request())
    out += server.data_to_send()
    return events, out, state(server)


def test_a_repeated_dialogue_is_parsed_once_with_the_same_events_output_and_state(
        fresh_memo: dict[str, int]) -> None:
    first = _dialogue(Socks5Server())
    parsed = dict(fresh_memo)
    for _ in range(3):
        assert _dialogue(Socks5Server()) == first
    assert fresh_memo == parsed  # no parser ran again
    assert first[2] is Socks5State.AWAITING_REPLY
    # Another state for the same bytes, other bytes, or the other no-auth setting: parsed.
    server = Socks5Server(allow_no_auth=True)
    assert server.receive_data(GREETING) == [MethodSelected(Method.USERNAME_PASSWORD)]
    assert fresh_memo["greeting"] == parsed["greeting"] + 1


def test_split_messages_and_failures_are_never_remembered(fresh_memo: dict[str, int]) -> None:
    for _ in range(2):
        server = Socks5Server()
        for byte in GREETING:  # split: parsed every time
            server.receive_data(bytes([byte]))
        assert state(server) is Socks5State.AUTH
    for _ in range(2):  # a failure is found again, with its reply, each time
        server = Socks5Server()
        events = server.receive_data(b"\x05\x00")
        assert events == [ProtocolFailure(None, "no authentication method offered")]
        assert server.data_to_send() == b"\x05\xff" and state(server) is Socks5State.FAILED
    # A message followed by tunnel bytes in the same read is parsed each time too.
    for _ in range(2):
        server = authenticated()
        server.receive_data(request() + b"early")
        assert server.remainder() == b"early"
    assert fresh_memo["request"] == 2  # parsed both times
