"""LinkCore driven back to back in memory (no sockets, no event loop): the credit policy,
half-close, resets and GOAWAY, frame by frame."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes

from egressd.mux.capsule import (
    CapsuleError,
    CapsuleReader,
    decode_varint,
    encode_datagram,
    encode_varint,
)
from egressd.mux.core import (
    REASON_HEADER,
    LinkClosed,
    LinkCore,
    LinkEvent,
    LinkSettings,
    PeerReady,
    PingAcknowledged,
    RequestReceived,
    ResponseReceived,
    StreamFailed,
)
from egressd.mux.errors import MuxError, StreamReset, Unprocessed

REQUEST = [
    (":method", "CONNECT"),
    (":protocol", "egressd-tcp"),
    (":scheme", "https"),
    (":path", "/"),
    (":authority", "egressd"),
    ("egressd-account", "acme"),
]
KIB = 1024


class Pair:
    """A client core and a server core wired to each other."""

    def __init__(self, settings: LinkSettings | None = None) -> None:
        self.client = LinkCore(client=True, settings=settings)
        self.server = LinkCore(client=False, settings=settings)
        self.client_events: list[LinkEvent] = []
        self.server_events: list[LinkEvent] = []
        self.client.start()
        self.server.start()
        self.exchange()

    def exchange(self) -> None:
        """Deliver bytes both ways until both are quiet."""
        while True:
            self.client_events += self.client.take_events()
            self.server_events += self.server.take_events()
            to_server, to_client = self.client.data_to_send(), self.server.data_to_send()
            if not to_server and not to_client:
                return
            if to_server:
                self.server.receive(to_server)
            if to_client:
                self.client.receive(to_client)

    def open(self) -> int:
        stream_id = self.client.open_stream(REQUEST)
        assert stream_id is not None
        self.exchange()
        self.server.respond(stream_id, 200, {}, end_stream=False)
        self.exchange()
        return stream_id

    def fill(self, stream_id: int) -> int:
        """Send on ``stream_id`` until the client's window is shut; bytes sent."""
        total = 0
        while taken := self.client.send(stream_id, b"x" * (64 * KIB)):
            total += taken
            self.exchange()
        return total


def test_handshake_advertises_extended_connect() -> None:
    pair = Pair()
    assert PeerReady(connect_protocol=True) in pair.client_events
    assert PeerReady(connect_protocol=False) in pair.server_events  # clients do not offer it


def test_request_response_data_and_half_close_both_ways() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(REQUEST)
    assert stream_id == 1
    pair.exchange()
    [request] = [e for e in pair.server_events if isinstance(e, RequestReceived)]
    assert request.headers[":protocol"] == "egressd-tcp"
    assert request.headers["egressd-account"] == "acme"
    pair.server.respond(1, 200, {"egressd-egress": "lax"}, end_stream=False)
    pair.exchange()
    assert ResponseReceived(1, 200, {"egressd-egress": "lax"}) in pair.client_events

    assert pair.client.send(1, b"hello") == 5
    pair.client.end_stream(1)
    pair.exchange()
    assert pair.server.read(1) == b"hello"
    assert pair.server.read(1) == b""
    # The server's direction is still open after the client's half-close.
    pair.server.send(1, b"world")
    pair.exchange()
    assert pair.client.read(1) == b"world"
    assert pair.client.read(1) is None
    pair.server.end_stream(1)
    pair.exchange()
    assert pair.client.read(1) == b""
    assert not pair.client.has_stream(1)  # both directions over, end seen: forgotten
    assert not pair.server.has_stream(1)


def test_a_request_that_is_not_extended_connect_is_answered_400_without_the_application() -> None:
    pair = Pair()
    get = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")]
    stream_id = pair.client.open_stream(get)
    assert stream_id is not None
    pair.exchange()
    assert not [e for e in pair.server_events if isinstance(e, RequestReceived)]
    [response] = [e for e in pair.client_events if isinstance(e, ResponseReceived)]
    assert response.status == 400
    assert "extended CONNECT" in response.headers[REASON_HEADER]


def test_a_stopped_reader_holds_back_its_stream_only_not_the_connection() -> None:
    settings = LinkSettings(stream_window=128 * KIB, connection_window=256 * KIB)
    pair = Pair(settings)
    streams = [pair.open() for _ in range(4)]
    # Four unread streams take twice the connection window: credit came back on receipt.
    for stream_id in streams:
        assert pair.fill(stream_id) == 128 * KIB
    assert pair.server.buffered == 4 * 128 * KIB
    fresh = pair.open()
    assert pair.client.send(fresh, b"still flowing") == len(b"still flowing")
    pair.exchange()
    assert pair.server.read(fresh) == b"still flowing"
    # Reading returns the stream's credit, and only that stream's.
    assert len(pair.server.read(streams[0]) or b"") == 128 * KIB
    pair.exchange()
    assert pair.client.send_window(streams[0]) == 128 * KIB
    assert pair.client.send_window(streams[1]) == 0


def test_connection_credit_stops_past_max_buffered_and_resumes_as_readers_catch_up() -> None:
    settings = LinkSettings(
        stream_window=128 * KIB, connection_window=128 * KIB, max_buffered=256 * KIB
    )
    pair = Pair(settings)
    streams = [pair.open() for _ in range(6)]
    sent = sum(pair.fill(stream_id) for stream_id in streams)
    # Unread bytes stop at max_buffered plus at most one connection window.
    assert 256 * KIB < pair.server.buffered <= 256 * KIB + 128 * KIB
    assert sent == pair.server.buffered
    assert sent < 6 * 128 * KIB
    for stream_id in streams[:3]:
        pair.server.read(stream_id)
    pair.exchange()
    assert sum(pair.fill(stream_id) for stream_id in streams[3:]) > 0


def test_reset_by_the_peer_fails_reads_and_writes() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.send(stream_id, b"lost")
    pair.server.reset(stream_id)
    pair.exchange()
    [failed] = [e for e in pair.client_events if isinstance(e, StreamFailed)]
    assert failed.stream_id == stream_id
    with pytest.raises(StreamReset) as reset:
        pair.client.read(stream_id)
    assert reset.value.by_peer and reset.value.error_code == ErrorCodes.CANCEL
    with pytest.raises(MuxError):
        pair.client.send(stream_id, b"more")


def test_data_before_a_no_error_reset_after_end_stream_is_still_delivered() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.send(stream_id, b"complete response")
    pair.server.end_stream(stream_id)
    pair.server.release(stream_id)  # "stop sending": RST_STREAM(NO_ERROR)
    pair.exchange()
    [failed] = [e for e in pair.client_events if isinstance(e, StreamFailed)]
    assert isinstance(failed.error, StreamReset)
    assert failed.error.error_code == ErrorCodes.NO_ERROR
    with pytest.raises(StreamReset):
        pair.client.send(stream_id, b"too late")
    assert pair.client.read(stream_id) == b"complete response"
    assert pair.client.read(stream_id) == b""


def test_goaway_fails_open_streams_and_marks_unprocessed_ones_retryable() -> None:
    pair = Pair()
    processed = pair.open()
    unprocessed = pair.client.open_stream(REQUEST)
    assert unprocessed is not None
    pair.server.close()  # GOAWAY before the second request arrives
    pair.client.receive(pair.server.data_to_send())
    events = pair.client.take_events()
    errors = {e.stream_id: e.error for e in events if isinstance(e, StreamFailed)}
    assert isinstance(errors[unprocessed], Unprocessed)
    assert isinstance(errors[processed], MuxError)
    assert not isinstance(errors[processed], Unprocessed)
    assert any(isinstance(e, LinkClosed) for e in events)
    with pytest.raises(MuxError):
        pair.client.open_stream(REQUEST)


def test_ping_is_acknowledged_with_its_payload() -> None:
    pair = Pair()
    pair.client.ping(b"12345678")
    pair.exchange()
    assert PingAcknowledged(b"12345678") in pair.client_events


def test_release_resets_an_open_stream_and_frees_its_buffer() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.send(stream_id, b"unread")
    pair.exchange()
    assert pair.server.buffered == 6
    pair.server.release(stream_id)
    pair.exchange()
    assert pair.server.buffered == 0
    with pytest.raises(StreamReset):
        pair.client.send(stream_id, b"x")


def test_capsules_round_trip_in_any_slicing() -> None:
    payloads = [b"", b"a", bytes(range(256)) * 5 + b"z", b"\x00" * 1400, b"x" * 20_000]
    wire = b"".join(encode_datagram(p) for p in payloads)
    wire += encode_varint(0x2A) + encode_varint(3) + b"???"  # unknown capsule: skipped
    for step in (1, 7, 1000, len(wire)):
        reader = CapsuleReader()
        got = []
        for offset in range(0, len(wire), step):
            got += [d.payload for d in reader.feed(wire[offset : offset + step])]
        assert got == payloads
        assert reader.pending == 0


def test_an_oversized_capsule_is_an_error() -> None:
    with pytest.raises(CapsuleError):
        CapsuleReader().feed(encode_varint(0) + encode_varint(1 << 20))
    for value in (0, 63, 64, 16_383, 16_384, 2**30 - 1, 2**30, 2**62 - 1):
        assert decode_varint(encode_varint(value)) == (value, len(encode_varint(value)))
