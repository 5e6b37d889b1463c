"""The mux package's errors: one hierarchy, so callers catch ``MuxError`` and nothing else.

h2's exceptions, ``ssl.SSLError`` and ``OSError`` from the link are mapped to these at
the package's edges (the link shell, ``MuxClient`` and ``pump``).
"""

from __future__ import annotations

import enum

from h2.errors import ErrorCodes

__all__ = ["MuxError", "PumpError", "StreamRefused", "StreamReset"]


class MuxError(Exception):
    """A link-level failure: no link, TLS refused, link lost, protocol error, stream gone."""


class StreamRefused(MuxError):
    """The peer answered the extended CONNECT with a non-2xx status.

    ``reason`` comes from the response's ``egressd-reason`` header (empty if absent).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"stream refused: {status} {reason}".rstrip())
        self.status = status
        self.reason = reason


def error_code_name(code: int) -> str:
    """``CANCEL`` for 0x8; the number for a code RFC 9113 does not define."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return hex(code)


class StreamReset(MuxError):
    """The stream was reset (RST_STREAM): by the peer (``by_peer``) or locally."""

    def __init__(self, error_code: int, *, by_peer: bool) -> None:
        who = "peer" if by_peer else "local side"
        super().__init__(f"stream reset by the {who} ({error_code_name(error_code)})")
        self.error_code = error_code
        self.by_peer = by_peer


class Unprocessed(MuxError):
    """The peer's GOAWAY says it never processed this stream: safe to retry elsewhere."""


class Side(enum.Enum):
    STREAM = "stream"
    SOCKET = "socket"


class PumpError(MuxError):
    """``pump`` ended on an error; the byte counts say how far each direction got.

    ``side`` is where the error happened: the mux stream (reset, link lost) or the
    socket (reset by the other end, ...). The original exception is ``__cause__``.
    """

    def __init__(self, side: Side, error: BaseException, to_socket: int, to_stream: int) -> None:
        super().__init__(f"relay failed on the {side.value} side: {error}")
        self.side = side
        self.to_socket = to_socket
        self.to_stream = to_stream
