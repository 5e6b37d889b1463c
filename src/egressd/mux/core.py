"""The sans-I/O core of a mux link: one HTTP/2 connection, bytes in, events and bytes out.

Theory of operation. ``LinkCore`` drives an ``h2`` connection (itself a sans-I/O state
machine) and adds what h2 leaves to its user: one record per flow (``_Flow``) holding the
bytes received and not yet read, the half-close and reset state of each direction, and
the flow-control *credit policy*:

* connection-level credit (WINDOW_UPDATE on stream 0) goes back as soon as DATA arrives,
  as long as the bytes received and not yet read on the whole link stay under
  ``max_buffered``; so a stream whose reader stops holds back its own window only, and
  never the link's;
* stream-level credit goes back when the application reads (``read``), a quarter window
  at a time; so a slow reader slows its sender, and nobody else.

The shell feeds it bytes (``receive``), calls its commands (``open_stream``, ``respond``,
``send``, ``end_stream``, ``reset``, ``read``, ``release``, ``ping``, ``close``), sends
``data_to_send()`` and acts on ``take_events()``. Commands raise ``MuxError`` when the
stream or link state forbids them (never an h2 exception), ``RuntimeError`` on misuse
(answering a request twice). Requests that are not extended CONNECT (RFC 8441) are answered 400 here
and never reach the application.

What it does not know: sockets, TLS, tasks, clocks, who the peer is, what a flow carries.
After a GOAWAY (sent or received) h2 refuses to send anything, so a closing link fails
every stream at once instead of draining them; streams the peer never processed fail with
``Unprocessed`` and may be retried on a new link.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame

from egressd.mux.errors import MuxError, StreamReset, Unprocessed, error_code_name


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 4.4 builds `repr(frame)` for its trace log on every frame it receives, whether or not
# anything logs it, and a DATA frame's repr hex-encodes its whole body (64 KiB) to keep 20
# characters of it: a third of a PoP's CPU on a bulk backbone flow (benchmarks/backbone.py).
# The repr of a DATA frame is only ever text for a log line; make it cheap.
DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]

__all__ = [
    "REASON_HEADER",
    "LinkClosed",
    "LinkCore",
    "LinkEvent",
    "LinkSettings",
    "PeerReady",
    "PingAcknowledged",
    "Readable",
    "RequestReceived",
    "ResponseReceived",
    "SlotFreed",
    "StreamFailed",
    "Writable",
]

#: The response header that says why a stream was refused.
REASON_HEADER: Final = "egressd-reason"
_H2_DEFAULT_WINDOW: Final = 65_535
_MAX_WINDOW: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What one side of a link advertises and how much it buffers.

    The defaults suit a fast backbone: 1 MiB per stream keeps one bulk flow at ~1 GB/s
    on a 1 ms path (and ~17 MB/s at 60 ms), 16 MiB lets 16 of them run at once before
    the connection window matters. Unread bytes are bounded per stream by
    ``stream_window`` and per link by ``max_buffered`` (past it, connection credit waits
    for the readers).
    """

    stream_window: int = 1 << 20
    connection_window: int = 16 << 20
    max_frame_size: int = 1 << 16
    max_concurrent_streams: int = 10_000
    max_buffered: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("stream_window", "connection_window"):
            if not _H2_DEFAULT_WINDOW <= getattr(self, name) <= _MAX_WINDOW:
                raise ValueError(f"{name} must be between 65535 and 2**31-1")
        if not 16_384 <= self.max_frame_size <= 16_777_215:
            raise ValueError("max_frame_size must be between 16384 and 16777215")
        if self.max_concurrent_streams < 1 or self.max_buffered < 0:
            raise ValueError("max_concurrent_streams must be positive, max_buffered >= 0")


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerReady:
    """The peer's first SETTINGS arrived; ``connect_protocol``: it accepts extended CONNECT."""

    connect_protocol: bool


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server side: a valid extended CONNECT opened stream ``stream_id``."""

    stream_id: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client side: the response to our CONNECT on ``stream_id``."""

    stream_id: int
    status: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Readable:
    """``read(stream_id)`` has something new to return (data, the end, or an error)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Writable:
    """The send window of ``stream_id`` grew; ``None``: maybe of every stream."""

    stream_id: int | None


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The stream was reset (either side) or lost with the link; its writes now raise."""

    stream_id: int
    error: MuxError


@dataclass(frozen=True, slots=True)
class SlotFreed:
    """One of our outbound streams closed, so ``open_stream`` may succeed again."""


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    payload: bytes


@dataclass(frozen=True, slots=True)
class LinkClosed:
    """GOAWAY sent or received, protocol error or connection lost: the link is done."""

    reason: str


LinkEvent = (
    PeerReady
    | RequestReceived
    | ResponseReceived
    | Readable
    | Writable
    | StreamFailed
    | SlotFreed
    | PingAcknowledged
    | LinkClosed
)


# --- per-flow state -------------------------------------------------------------------


@dataclass(slots=True)
class _Flow:
    outbound: bool  # we opened it (client side)
    chunks: deque[bytes] = field(default_factory=deque)
    unread: int = 0  # bytes in chunks
    owed: int = 0  # stream credit not yet returned to the peer
    remote_ended: bool = False  # END_STREAM received
    local_ended: bool = False  # END_STREAM sent
    answered: bool = False  # response sent (server) or received (client)
    read_done: bool = False  # the reader has been handed b"" or read_error
    error: MuxError | None = None  # set: writes raise it
    read_error: MuxError | None = None  # set: reads raise it (buffered data dropped)

    @property
    def closed(self) -> bool:
        return self.error is not None or (self.local_ended and self.remote_ended)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def header_dict(headers: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    """Header fields as a dict; a repeated field's values are joined with ", "."""
    result: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = _text(raw_name), _text(raw_value)
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result


def safe_header_value(text: str, limit: int = 200) -> str:
    """``text`` with control characters replaced, so that it is a valid field value."""
    cleaned = "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
    return cleaned.strip()[:limit]


class LinkCore:
    """One HTTP/2 connection carrying extended CONNECT streams; no I/O (see module doc)."""

    def __init__(self, *, client: bool, settings: LinkSettings | None = None) -> None:
        self._client = client
        self._settings = settings or LinkSettings()
        config = h2.config.H2Configuration(client_side=client, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(config=config)
        self._flows: dict[int, _Flow] = {}
        self._events: list[LinkEvent] = []
        self._buffered = 0  # received, not yet read, over all streams
        self._conn_owed = 0  # connection credit not yet returned
        self._peer_ready = False
        self.closed_reason: str | None = None

    # --- state --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def stream_count(self) -> int:
        """Streams this side still holds state for."""
        return len(self._flows)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._flows

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read, over all streams."""
        return self._buffered

    def send_window(self, stream_id: int) -> int:
        try:
            return self._conn.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            return 0

    def take_events(self) -> list[LinkEvent]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()

    # --- the connection -----------------------------------------------------------

    def start(self) -> None:
        """Queue the preface and our SETTINGS, and open the connection window."""
        self._conn.initiate_connection()
        local: dict[SettingCodes | int, int] = {
            SettingCodes.MAX_CONCURRENT_STREAMS: self._settings.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: self._settings.stream_window,
            SettingCodes.MAX_FRAME_SIZE: self._settings.max_frame_size,
        }
        if self._client:
            local[SettingCodes.ENABLE_PUSH] = 0
        else:
            local[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        self._conn.update_settings(local)
        extra = self._settings.connection_window - _H2_DEFAULT_WINDOW
        if extra > 0:
            self._conn.increment_flow_control_window(extra)

    def receive(self, data: bytes) -> None:
        """Bytes from the peer; their consequences are in ``take_events()``."""
        if self.closed:
            return
        try:
            h2_events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as error:  # h2 has queued a GOAWAY
            self._fail_link(f"protocol error: {error}")
            return
        for event in h2_events:
            self._handle(event)
        self._credit_connection()

    def connection_lost(self, reason: str) -> None:
        """The transport is gone: fail every stream."""
        if not self.closed:
            self._fail_link(reason)

    def close(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "closed") -> None:
        """Reset every open stream (CANCEL), then GOAWAY; the link is done."""
        if self.closed:
            return
        for stream_id, flow in self._flows.items():
            if not flow.closed:
                self._h2_quietly(self._conn.reset_stream, stream_id, ErrorCodes.CANCEL)
        self._h2_quietly(self._conn.close_connection, error_code)
        self._fail_link(reason)

    def ping(self, payload: bytes) -> None:
        self._check_open()
        self._h2(self._conn.ping, payload)

    # --- streams: commands --------------------------------------------------------

    def open_stream(self, headers: Iterable[tuple[str, str]]) -> int | None:
        """Send a request; its stream id, or ``None`` while the peer's stream limit is reached."""
        self._check_open()
        try:
            stream_id = self._conn.get_next_available_stream_id()
            self._conn.send_headers(stream_id, list(headers))
        except h2.exceptions.TooManyStreamsError:
            return None
        except h2.exceptions.NoAvailableStreamIDError:
            raise Unprocessed("this link has used up its stream ids") from None
        except h2.exceptions.ProtocolError as error:
            raise MuxError(f"cannot open a stream: {error}") from None
        self._flows[stream_id] = _Flow(outbound=True)
        return stream_id

    def respond(
        self, stream_id: int, status: int, headers: Mapping[str, str], *, end_stream: bool
    ) -> None:
        """Server side: answer the request on ``stream_id`` (once)."""
        flow = self._writable(stream_id)
        if flow.answered:
            raise RuntimeError(f"stream {stream_id} has already been answered")
        fields = [(":status", str(status)), *((k.lower(), v) for k, v in headers.items())]
        self._h2(self._conn.send_headers, stream_id, fields, end_stream)
        flow.answered = True
        if end_stream:
            self._local_end(stream_id, flow)

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the send windows allow; how many bytes were taken."""
        self._writable(stream_id)
        taken = min(self.send_window(stream_id), len(data))
        frame = self._conn.max_outbound_frame_size
        for offset in range(0, taken, frame):
            piece = data[offset : min(offset + frame, taken)]
            self._h2(self._conn.send_data, stream_id, piece)
        return taken

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM); idempotent."""
        flow = self._writable(stream_id, allow_ended=True)
        if not flow.local_ended:
            self._h2(self._conn.end_stream, stream_id)
            self._local_end(stream_id, flow)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM: both directions fail, buffered data is dropped; no-op once closed."""
        flow = self._flows.get(stream_id)
        if flow is None or flow.closed or self.closed:
            return
        self._h2_quietly(self._conn.reset_stream, stream_id, error_code)
        self._fail_flow(stream_id, flow, StreamReset(error_code, by_peer=False), reads=True)

    def read(self, stream_id: int) -> bytes | None:
        """Everything received so far; ``b""`` at the peer's END_STREAM; ``None``: nothing yet.

        Raises the stream's error (reset, link lost) once its buffered data is gone.
        Reading returns stream credit to the peer.
        """
        flow = self._flows.get(stream_id)
        if flow is None:
            raise MuxError(f"stream {stream_id} is closed")
        if flow.chunks:
            data = flow.chunks.popleft() if len(flow.chunks) == 1 else b"".join(flow.chunks)
            flow.chunks.clear()
            flow.unread = 0
            self._buffered -= len(data)
            self._credit_stream(stream_id, flow, len(data))
            self._credit_connection()
            return data
        if flow.read_error is not None:
            flow.read_done = True
            self._maybe_forget(stream_id, flow)
            raise flow.read_error
        if flow.remote_ended:
            flow.read_done = True
            self._maybe_forget(stream_id, flow)
            return b""
        return None

    def release(self, stream_id: int) -> None:
        """The application is done with the stream: reset it if still open, drop its state.

        The reset says CANCEL if our direction was still open, NO_ERROR if only the
        peer's was (RFC 9113 §8.1: "stop sending, the response is complete").
        """
        flow = self._flows.pop(stream_id, None)
        if flow is None:
            return
        self._buffered -= flow.unread
        if not flow.closed and not self.closed:
            code = ErrorCodes.NO_ERROR if flow.local_ended else ErrorCodes.CANCEL
            self._h2_quietly(self._conn.reset_stream, stream_id, code)
            self._events.append(StreamFailed(stream_id, StreamReset(code, by_peer=False)))
            if flow.outbound:
                self._events.append(SlotFreed())
        self._credit_connection()

    # --- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise MuxError(f"link closed: {self.closed_reason}")

    def _writable(self, stream_id: int, *, allow_ended: bool = False) -> _Flow:
        self._check_open()
        flow = self._flows.get(stream_id)
        if flow is None:
            raise MuxError(f"stream {stream_id} is closed")
        if flow.error is not None:
            raise flow.error
        if flow.local_ended and not allow_ended:
            raise MuxError(f"stream {stream_id}: write after write_eof")
        return flow

    def _h2(self, command: Callable[..., object], *args: object) -> None:
        """Run an h2 command, mapping its exceptions to ``MuxError``."""
        try:
            command(*args)
        except (h2.exceptions.ProtocolError, KeyError) as error:
            raise MuxError(f"HTTP/2: {error!r}") from None

    def _h2_quietly(self, command: Callable[..., object], *args: object) -> None:
        """``_h2`` for cleanup paths (close, release, refusing): a failure changes nothing."""
        with contextlib.suppress(MuxError):
            self._h2(command, *args)

    def _local_end(self, stream_id: int, flow: _Flow) -> None:
        flow.local_ended = True
        if flow.outbound and flow.remote_ended:
            self._events.append(SlotFreed())
        self._maybe_forget(stream_id, flow)

    def _maybe_forget(self, stream_id: int, flow: _Flow) -> None:
        if flow.read_done and flow.closed:
            del self._flows[stream_id]

    def _fail_flow(self, stream_id: int, flow: _Flow, error: MuxError, *, reads: bool) -> None:
        flow.error = error
        if reads or not flow.remote_ended:
            flow.read_error = error
            self._buffered -= flow.unread
            flow.chunks.clear()
            flow.unread = 0
        self._events.append(StreamFailed(stream_id, error))
        self._events.append(Readable(stream_id))
        if flow.outbound:
            self._events.append(SlotFreed())
        self._maybe_forget(stream_id, flow)

    def _fail_link(self, reason: str, last_processed: int | None = None) -> None:
        self.closed_reason = reason
        for stream_id, flow in list(self._flows.items()):
            if flow.closed:
                continue
            error: MuxError
            if last_processed is not None and flow.outbound and stream_id > last_processed:
                error = Unprocessed(f"the peer closed the link before this stream: {reason}")
            else:
                error = MuxError(f"link closed: {reason}")
            self._fail_flow(stream_id, flow, error, reads=False)
        self._events.append(LinkClosed(reason))

    def _credit_stream(self, stream_id: int, flow: _Flow, consumed: int) -> None:
        if flow.remote_ended or flow.error is not None or self.closed:
            return  # the peer sends no more on it
        flow.owed += consumed
        if flow.owed >= self._settings.stream_window // 4:
            self._h2_quietly(self._conn.increment_flow_control_window, flow.owed, stream_id)
            flow.owed = 0

    def _credit_connection(self) -> None:
        if (
            self._conn_owed >= self._settings.connection_window // 16
            and self._buffered <= self._settings.max_buffered
            and not self.closed
        ):
            self._h2_quietly(self._conn.increment_flow_control_window, self._conn_owed)
            self._conn_owed = 0

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            flow = self._flows.get(event.stream_id)
            if flow is not None and flow.read_error is None:
                flow.remote_ended = True
                if flow.outbound and flow.local_ended:
                    self._events.append(SlotFreed())
                self._events.append(Readable(event.stream_id))
        elif isinstance(event, h2.events.WindowUpdated):
            self._events.append(Writable(event.stream_id or None))
        elif isinstance(event, h2.events.StreamReset):
            flow = self._flows.get(event.stream_id)
            if flow is not None and flow.error is None:
                error = StreamReset(int(event.error_code), by_peer=True)
                self._fail_flow(event.stream_id, flow, error, reads=False)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            flow = self._flows.get(event.stream_id)
            if flow is not None and not flow.answered:
                flow.answered = True
                headers = header_dict(event.headers)
                status = int(headers.pop(":status", "0"))
                self._events.append(ResponseReceived(event.stream_id, status, headers))
        elif isinstance(event, h2.events.PingAckReceived):
            self._events.append(PingAcknowledged(bytes(event.ping_data)))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._on_settings(event)
        elif isinstance(event, h2.events.ConnectionTerminated):
            reason = f"GOAWAY from the peer ({error_code_name(int(event.error_code or 0))})"
            self._fail_link(reason, last_processed=event.last_stream_id or 0)
        # Trailers, informational responses, priority, unknown frames: nothing to do.

    def _on_data(self, event: h2.events.DataReceived) -> None:
        length = event.flow_controlled_length or 0
        self._conn_owed += length
        flow = self._flows.get(event.stream_id)
        if flow is None or flow.read_error is not None:
            return  # released or reset: the bytes go nowhere, the connection credit back
        data = event.data or b""
        if data:
            flow.chunks.append(data)
            flow.unread += len(data)
            self._buffered += len(data)
        flow.owed += length - len(data)  # padding: credited with the next read
        self._events.append(Readable(event.stream_id))

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        headers = header_dict(event.headers)
        if headers.get(":method") != "CONNECT" or not headers.get(":protocol"):
            answer = [(":status", "400"), (REASON_HEADER, "extended CONNECT (RFC 8441) expected")]
            self._h2_quietly(self._conn.send_headers, event.stream_id, answer, True)
            if event.stream_ended is None:
                self._h2_quietly(self._conn.reset_stream, event.stream_id, ErrorCodes.NO_ERROR)
            return
        self._flows[event.stream_id] = _Flow(outbound=False)
        self._events.append(RequestReceived(event.stream_id, headers))

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        if SettingCodes.INITIAL_WINDOW_SIZE in changed or SettingCodes.MAX_FRAME_SIZE in changed:
            self._events.append(Writable(None))
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            self._events.append(SlotFreed())
        if not self._peer_ready:
            self._peer_ready = True
            enabled = self._conn.remote_settings.enable_connect_protocol == 1
            self._events.append(PeerReady(connect_protocol=enabled))
