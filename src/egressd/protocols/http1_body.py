"""HTTP/1.1 message framing (RFC 9112 §2, §6-7): where heads and bodies end.

This is the lower half of :mod:`egressd.protocols.http1` (which re-exports the public
names): the error types, the field grammar, the framing fields (Content-Length,
Transfer-Encoding, Connection), :class:`HeadBuffer` that finds complete heads, and
:class:`BodyTracker` that finds the end of a body.

The proxy forwards message bodies verbatim; it never decodes them. What it must know is
where a message ends, so that the next request or response on a kept-alive connection
starts at the right byte and the two ends cannot disagree about it (request smuggling).
:class:`BodyTracker` answers exactly that.

Theory of operation: a :class:`BodyTracker` is created from the :class:`BodyFraming` of
a parsed head and is fed the bytes that follow the head. ``feed(data)`` returns how many
leading bytes of ``data`` belong to the message; when that is less than ``len(data)``
the message has ended and the rest belongs to the next one. Its states and the allowed
moves between them are :data:`_TRANSITIONS`; every non-terminal state may also move to
FAILED, after which every call raises the same :class:`HttpError`:

* FIXED (Content-Length: N bytes remain) -> DONE
* CHUNK_SIZE (reading a chunk-size line) -> CHUNK_DATA, or TRAILERS after the last chunk
* CHUNK_DATA (skipping chunk data) -> CHUNK_DATA_END (its CRLF) -> CHUNK_SIZE
* TRAILERS (trailer field lines) -> DONE at the empty line
* UNTIL_CLOSE (a response delimited by the connection closing) -> DONE on :meth:`eof`

Chunk-size lines and trailers are validated strictly (hex size of at most 16 digits and
below 2**63, no sign, well-formed extensions, CRLF only, no obs-fold, no control bytes). A line is fully
checked when its LF arrives, before ``feed`` returns any byte of that call; the bytes of
a line still incomplete at the end of a call are already counted as forwarded, so they
are checked as far as possible (no LF, no bare CR, no control bytes) on arrival: a peer
can never see a line end that this tracker did not see.

What it does not know: sockets, the clock, content codings, or what the trailers mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NoReturn

from egressd.protocols.states import StateEnum

__all__ = [
    "CHUNKED",
    "FIELD_LINE",
    "NO_BODY",
    "TCHAR",
    "TOKEN",
    "TRACKED_FIELDS",
    "UNTIL_CLOSE",
    "BodyFraming",
    "BodyKind",
    "BodyState",
    "BodyTracker",
    "HeadBuffer",
    "Headers",
    "HttpError",
    "ProtocolError",
    "collect_fields",
    "describe_bad_field_line",
    "keep_alive_for",
    "parse_connection_tokens",
    "parse_content_length",
    "parse_transfer_codings",
]


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol; the connection cannot continue."""


class HttpError(ProtocolError):
    """An HTTP/1 protocol error, with the status the proxy should answer it with.

    ``status`` is 400/414/431/501/505 for a device's request and 502 for an upstream
    response; ``reason`` says what was wrong, for logs and the error page.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# --- field grammar (RFC 9110 §5), shared by the head readers and the trailers ----------
# One compiled regex per line: on CPython this is the fastest way to validate a line.

#: tchar (RFC 9110 §5.6.2) as a regex character class.
TCHAR: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_FIELD_TEXT: Final = rb"[\t\x20-\x7e\x80-\xff]"
#: field-line = field-name ":" OWS field-value OWS; the value may hold HTAB, SP, VCHAR
#: and obs-text, nothing else (no CR, LF, NUL or other control byte). No space before
#: the colon: the name must be a token.
FIELD_LINE: Final = re.compile(TCHAR + rb"+:" + _FIELD_TEXT + rb"*")
#: A whole field section (the lines between the start line and the empty line, CRLF
#: between them): validated in one pass, then split into (name, stripped value) pairs by
#: one `findall`. Per-line Python work was most of the cost of parsing a head.
_FIELD_SECTION: Final = re.compile(
    rb"(?:" + TCHAR + rb"+:" + _FIELD_TEXT + rb"*)(?:\r\n" + TCHAR + rb"+:" + _FIELD_TEXT + rb"*)*")
#: (name, value) of each line of a *validated* section; trailing OWS is stripped after.
_FIELD_PAIR: Final = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*)")
_QUOTED_STRING: Final = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
#: chunk-size [ chunk-ext ] (RFC 9112 §7.1.1): 1-16 hex digits, then
#: *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS ( token / quoted-string ) ] ).
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*"
    + TCHAR
    + rb"+(?:[ \t]*=[ \t]*(?:"
    + TCHAR
    + rb"+|"
    + _QUOTED_STRING
    + rb"))?)*"
)
#: What an incomplete line may hold so far: field-value bytes, and a CR only at the end.
_PARTIAL_LINE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\r?")

#: A field name or list element that must be a token.
TOKEN: Final = re.compile(TCHAR + rb"+")
#: A Connection header may not name these: dropping them would change the framing the
#: upstream sees (a smuggling vector), so such a message is rejected.
_NOT_HOP_BY_HOP: Final = frozenset({"content-length", "transfer-encoding", "host"})
#: The fields the head parsers look at (the others are only carried).
TRACKED_FIELDS: Final = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection"}
    | {b"proxy-connection", b"proxy-authorization"}
)
_MAX_CONTENT_LENGTH_DIGITS: Final = 18
#: Largest chunk size accepted: a signed 64-bit integer. 16 hex digits could say up to
#: 2**64 - 1, which a peer keeping sizes in an int64 reads as negative (a smuggling vector).
_MAX_CHUNK_SIZE: Final = 2**63 - 1
#: Names that are not framing fields, but become one where a server maps "_" to "-"
#: (CGI/WSGI environ keys: HTTP_CONTENT_LENGTH): two readings of one message.
_FRAMING_LOOKALIKES: Final = frozenset({b"content_length", b"transfer_encoding"})
#: (name, value) pairs in received order and case.
Headers = tuple[tuple[bytes, bytes], ...]


def describe_bad_field_line(line: bytes) -> str:
    """Why ``line`` is not a valid field line (called only after it failed to match)."""
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding (obs-fold) is not accepted"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "field line without a colon"
    if name[-1:] in (b" ", b"\t"):
        return "whitespace between field name and colon"
    if TOKEN.fullmatch(name) is None:
        return "invalid field name"
    return "invalid byte in field value (control character, CR or LF)"


class BodyKind(StateEnum):
    """How the end of a message body is found (RFC 9112 §6.3)."""

    NONE = "none"
    CONTENT_LENGTH = "content-length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


@dataclass(frozen=True, slots=True)
class BodyFraming:
    """The framing of one message body; ``length`` is meaningful for CONTENT_LENGTH only."""

    kind: BodyKind
    length: int = 0

    @classmethod
    def content_length(cls, length: int) -> BodyFraming:
        if length < 0:
            raise ValueError("content length cannot be negative")
        return cls(BodyKind.CONTENT_LENGTH, length)

    @property
    def has_body(self) -> bool:
        """True unless the message certainly has no body bytes."""
        return self.kind is not BodyKind.NONE and not (
            self.kind is BodyKind.CONTENT_LENGTH and self.length == 0
        )


NO_BODY: Final = BodyFraming(BodyKind.NONE)
CHUNKED: Final = BodyFraming(BodyKind.CHUNKED)
UNTIL_CLOSE: Final = BodyFraming(BodyKind.UNTIL_CLOSE)


class BodyState(StateEnum):
    FIXED = "fixed"
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    CHUNK_DATA_END = "chunk-data-end"
    TRAILERS = "trailers"
    UNTIL_CLOSE = "until-close"
    DONE = "done"
    FAILED = "failed"


_S = BodyState
#: Allowed moves (besides any non-terminal state -> FAILED). Adding a case is adding a row.
_TRANSITIONS: Final[dict[BodyState, frozenset[BodyState]]] = {
    _S.FIXED: frozenset({_S.DONE}),
    _S.CHUNK_SIZE: frozenset({_S.CHUNK_DATA, _S.TRAILERS}),
    _S.CHUNK_DATA: frozenset({_S.CHUNK_DATA_END}),
    _S.CHUNK_DATA_END: frozenset({_S.CHUNK_SIZE}),
    _S.TRAILERS: frozenset({_S.DONE}),
    _S.UNTIL_CLOSE: frozenset({_S.DONE}),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
}
_LINE_STATES: Final = frozenset({_S.CHUNK_SIZE, _S.CHUNK_DATA_END, _S.TRAILERS})


class BodyTracker:
    """Finds where one message body ends in the byte stream that follows its head.

    >>> tracker = BodyTracker(head.body)
    >>> n = tracker.feed(data)       # data[:n] belongs to this message: forward it
    >>> tracker.done                 # True once the whole body has been seen
    >>> tracker.eof()                # the peer closed: fine for UNTIL_CLOSE, else an error

    ``error_status`` is the status carried by the :class:`HttpError` raised on bad
    framing: 400 for a request body, 502 for a response body.
    """

    def __init__(
        self,
        framing: BodyFraming,
        *,
        error_status: int = 400,
        max_line: int = 4096,
        max_trailer_section: int = 64 * 1024,
        max_trailer_fields: int = 100,
    ) -> None:
        self._error_status = error_status
        self._max_line = max_line
        self._max_trailer_section = max_trailer_section
        self._max_trailer_fields = max_trailer_fields
        self._remaining = 0  # FIXED: body bytes left; CHUNK_DATA: chunk bytes left
        self._line = bytearray()  # the incomplete line in a line state
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._error: HttpError | None = None
        kind = framing.kind
        if kind is BodyKind.CONTENT_LENGTH and framing.length > 0:
            self._state = _S.FIXED
            self._remaining = framing.length
        elif kind is BodyKind.CHUNKED:
            self._state = _S.CHUNK_SIZE
        elif kind is BodyKind.UNTIL_CLOSE:
            self._state = _S.UNTIL_CLOSE
        else:
            self._state = _S.DONE

    @property
    def state(self) -> BodyState:
        return self._state

    @property
    def done(self) -> bool:
        """True once the end of the message has been seen."""
        return self._state is _S.DONE

    def feed(self, data: bytes | bytearray) -> int:
        """Count of leading bytes of ``data`` that belong to the message (0 once done).

        Raises :class:`HttpError` on invalid chunked framing, and again on every later call.
        """
        state = self._state
        if state is _S.FIXED:  # the common case first
            take = min(self._remaining, len(data))
            self._remaining -= take
            if self._remaining == 0:
                self._goto(_S.DONE)
            return take
        if state is _S.UNTIL_CLOSE:
            return len(data)
        if state is _S.DONE:
            return 0
        if state is _S.FAILED:
            raise self._stored_error()
        return self._feed_chunked(data)

    def eof(self) -> None:
        """The peer closed its side. Raises :class:`HttpError` if the body is incomplete."""
        if self._state is _S.UNTIL_CLOSE:
            self._goto(_S.DONE)
        elif self._state is _S.FAILED:
            raise self._stored_error()
        elif self._state is not _S.DONE:
            self._fail("connection closed before the end of the message body")

    # -- internals ------------------------------------------------------------------

    def _goto(self, state: BodyState) -> None:
        if state not in _TRANSITIONS[self._state]:  # a bug in this module, not bad input
            raise RuntimeError(f"body tracker: no transition {self._state} -> {state}")
        self._state = state

    def _fail(self, reason: str) -> NoReturn:
        self._state = _S.FAILED
        self._error = HttpError(self._error_status, reason)
        raise self._error

    def _stored_error(self) -> HttpError:
        return self._error or HttpError(self._error_status, "body framing already failed")

    def _feed_chunked(self, data: bytes | bytearray) -> int:
        pos = 0
        end_of_data = len(data)
        while pos < end_of_data:
            state = self._state
            if state is _S.CHUNK_DATA:
                take = min(self._remaining, end_of_data - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._goto(_S.CHUNK_DATA_END)
                continue
            if state not in _LINE_STATES:  # DONE
                break
            lf = data.find(b"\n", pos)
            stop = end_of_data if lf < 0 else lf + 1
            line = self._line
            if len(line) + stop - pos > self._max_line:
                self._fail("chunk-size or trailer line too long")
            line += data[pos:stop]
            if lf < 0:
                self._check_partial_line(line)
                return end_of_data
            pos = stop
            self._line = bytearray()
            self._end_line(bytes(line))
        return pos

    def _check_partial_line(self, line: bytearray) -> None:
        if self._state is _S.CHUNK_DATA_END and not b"\r\n".startswith(line):
            self._fail("chunk data is not followed by CRLF")
        if _PARTIAL_LINE.fullmatch(line) is None:
            self._fail("invalid byte in chunk-size or trailer line")

    def _end_line(self, line: bytes) -> None:
        if line[-2:-1] != b"\r":
            self._fail("bare LF line ending in chunked body")
        content = line[:-2]
        state = self._state
        if state is _S.CHUNK_SIZE:
            match = _CHUNK_LINE.fullmatch(content)
            if match is None:
                self._fail("invalid chunk-size line")
            size = int(match.group(1), 16)
            if size > _MAX_CHUNK_SIZE:
                self._fail("chunk size does not fit in 63 bits")
            if size == 0:
                self._goto(_S.TRAILERS)
            else:
                self._remaining = size
                self._goto(_S.CHUNK_DATA)
        elif state is _S.CHUNK_DATA_END:
            if content:
                self._fail("chunk data is not followed by CRLF")
            self._goto(_S.CHUNK_SIZE)
        elif not content:  # TRAILERS: the empty line ends the message
            self._goto(_S.DONE)
        else:
            self._trailer_fields += 1
            self._trailer_bytes += len(line)
            if (
                self._trailer_fields > self._max_trailer_fields
                or self._trailer_bytes > self._max_trailer_section
            ):
                self._fail("trailer section too large")
            if FIELD_LINE.fullmatch(content) is None:
                self._fail("trailer: " + describe_bad_field_line(content))


# --- framing fields (RFC 9110 §5.6, §7.6.1, §8.6; RFC 9112 §6) ------------------------


def _list_items(values: list[bytes]) -> list[bytes]:
    return [item.strip(b" \t") for value in values for item in value.split(b",")]


_NO_TOKENS: Final[frozenset[str]] = frozenset()


def parse_connection_tokens(values: list[bytes], status: int) -> frozenset[str]:
    """Lower-cased Connection options; a framing field among them is an error."""
    if not values:
        return _NO_TOKENS
    tokens = set()
    for item in _list_items(values):
        if not item:
            continue  # RFC 9110 §5.6.1: empty list elements are ignored
        if TOKEN.fullmatch(item) is None:
            raise HttpError(status, "invalid Connection header")
        tokens.add(item.decode("ascii").lower())
    if tokens & _NOT_HOP_BY_HOP:
        raise HttpError(status, "Connection header names Content-Length, Transfer-Encoding or Host")
    return frozenset(tokens)


def keep_alive_for(version: str, tokens: frozenset[str]) -> bool:
    """Persistence per RFC 9112 §9.3: 1.1 unless "close", 1.0 only with "keep-alive"."""
    if "close" in tokens:
        return False
    return version == "HTTP/1.1" or "keep-alive" in tokens


def parse_content_length(values: list[bytes], status: int) -> int:
    """The one length all Content-Length values agree on (RFC 9110 §8.6), else an error."""
    length = -1
    for item in _list_items(values):
        if not item.isdigit() or len(item) > _MAX_CONTENT_LENGTH_DIGITS:  # ASCII digits only
            raise HttpError(status, "invalid Content-Length")
        value = int(item)
        if length >= 0 and value != length:
            raise HttpError(status, "conflicting Content-Length values")
        length = value
    return length


def parse_transfer_codings(values: list[bytes], status: int) -> list[str]:
    """Lower-cased codings in order; chunked, if present, must be last and appear once."""
    codings = []
    for item in _list_items(values):
        if TOKEN.fullmatch(item) is None:  # empty elements and parameters included
            raise HttpError(status, "invalid Transfer-Encoding")
        codings.append(item.decode("ascii").lower())
    if "chunked" in codings and (codings.count("chunked") > 1 or codings[-1] != "chunked"):
        raise HttpError(status, "chunked must be the last transfer coding, applied once")
    return codings


def collect_fields(section: bytes, status: int) -> tuple[Headers, dict[bytes, list[bytes]]]:
    """Validate a field section: (name, value) pairs, and the values of TRACKED_FIELDS by name.

    A name that differs from Content-Length or Transfer-Encoding only by "_" for "-"
    (``Content_Length``) is an error: some servers read it as the framing field.
    """
    if not section:
        return (), {}
    if _FIELD_SECTION.fullmatch(section) is None:
        bad = next(line for line in section.split(b"\r\n") if FIELD_LINE.fullmatch(line) is None)
        raise HttpError(status, describe_bad_field_line(bad))
    pairs = _FIELD_PAIR.findall(section)
    if b" \r\n" in section or b"\t\r\n" in section or section.endswith((b" ", b"\t")):
        pairs = [(name, value.rstrip(b" \t")) for name, value in pairs]
    headers: Headers = tuple(pairs)
    tracked: dict[bytes, list[bytes]] = {}
    lookalikes = b"_" in section
    for name, value in headers:
        lower = name.lower()
        if lower in TRACKED_FIELDS:
            tracked.setdefault(lower, []).append(value)
        elif lookalikes and b"_" in lower and lower.replace(b"-", b"_") in _FRAMING_LOOKALIKES:
            raise HttpError(status, f"field name {name.decode('ascii')} resembles a framing field")
    return headers, tracked


# --- buffering shared by both readers --------------------------------------------------


class HeadBuffer:
    """Finds complete heads in a byte stream and enforces the limits while waiting."""

    def __init__(
        self,
        max_start_line: int,
        max_field_section: int,
        max_fields: int,
        *,
        partial_start_line: re.Pattern[bytes],
        bad_status: int,
        long_line_status: int,
        large_section_status: int,
    ) -> None:
        self._max_start_line = max_start_line
        self._max_field_section = max_field_section
        self._max_fields = max_fields
        self._partial_start_line = partial_start_line
        self._bad_status = bad_status
        self._long_line_status = long_line_status
        self._large_section_status = large_section_status
        self._buf = bytearray()
        self._error: HttpError | None = None
        # Where the scan for the end of the head got to (less 3), the bytes before which
        # were checked for bare LF and start-line bytes, and the CR ending the start line
        # once seen. Reset inline after each head (a call per head and per remainder).
        self._searched, self._checked, self._start_line_end = 0, 0, -1

    def feed(self, data: bytes | bytearray) -> None:
        """Add received bytes (ignored once the reader has failed)."""
        if self._error is None:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken (a partial head, or what follows a head)."""
        return len(self._buf)

    def remainder(self) -> bytes:
        """Take the buffered bytes after the last head returned (body, tunnel or pipeline)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._searched, self._checked, self._start_line_end = 0, 0, -1
        return data

    def _fail(self, status: int, reason: str) -> NoReturn:
        self._error = HttpError(status, reason)
        raise self._error

    def _take_head(self) -> tuple[bytes, bytes] | None:
        """The start line and field section (CRLF-separated lines) of the next complete
        head, or None."""
        buf = self._buf
        while buf[:2] == b"\r\n":  # RFC 9112 §2.2: ignore empty lines before a start line
            del buf[:2]
            self._searched, self._checked, self._start_line_end = 0, 0, -1
        end = buf.find(b"\r\n\r\n", self._searched)
        if end < 0:
            self._check_partial()
            self._searched = max(0, len(buf) - 3)
            return None
        first = buf.find(b"\r\n")
        if first > self._max_start_line:
            self._fail(self._long_line_status, "start line too long")
        if end + 2 - first > self._max_field_section:
            self._fail(self._large_section_status, "header section too large")
        start_line = bytes(buf[:first])
        section = bytes(buf[first + 2 : end]) if end > first else b""
        if section and section.count(b"\r\n") >= self._max_fields:
            self._fail(self._large_section_status, "too many header fields")
        del buf[: end + 4]
        self._searched, self._checked, self._start_line_end = 0, 0, -1
        return start_line, section

    def _check_partial(self) -> None:
        """Reject what can already be seen to be wrong in an incomplete head."""
        buf = self._buf
        size = len(buf)
        pos = self._checked
        if self._start_line_end < 0:
            lf = buf.find(b"\n", pos)
            if self._partial_start_line.fullmatch(buf, pos, size if lf < 0 else lf) is None:
                self._fail(self._bad_status, "invalid byte in start line")
            if lf < 0:
                if size > self._max_start_line + 1:
                    self._fail(self._long_line_status, "start line too long")
                self._checked = size - 1 if buf.endswith(b"\r") else size
                return
            if lf == 0 or buf[lf - 1] != 0x0D:
                self._fail(self._bad_status, "bare LF line ending")
            if lf - 1 > self._max_start_line:
                self._fail(self._long_line_status, "start line too long")
            self._start_line_end = lf - 1
            pos = lf + 1
        lf = buf.find(b"\n", pos)
        while lf >= 0:
            if buf[lf - 1] != 0x0D:
                self._fail(self._bad_status, "bare LF line ending")
            lf = buf.find(b"\n", lf + 1)
        if size - self._start_line_end - 2 > self._max_field_section:
            self._fail(self._large_section_status, "header section too large")
        self._checked = size
