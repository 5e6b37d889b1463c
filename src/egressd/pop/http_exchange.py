"""The parts of callback forwarding (`http_forward`): its states, a kept upstream
connection, one exchange, and the answers to responses seen before.

A `KeptUpstream` is an asyncio protocol that tells its owner (the client connection's
`ForwardProxyProtocol`) everything that happens; it is reused only for the same
`UpstreamKey` (account, user, host, port, snapshot version): never shared across accounts
or source addresses. An `Exchange` is one request and its response; `whole_response` tells
whether a read is a whole response seen before, and `KnownResponses` what a connection
sends back for one. A `Detached` is a connection handed back to the coroutine handler.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol, cast

from egressd.pop.flowlog import FlowRecord
from egressd.pop.identity import Identity
from egressd.pop.runtime import PopRuntime
from egressd.pop.upstream import UpstreamError
from egressd.protocols.http1 import (
    BodyKind,
    BodyTracker,
    RequestHead,
    RequestHeadReader,
    ResponseHead,
    ResponseHeadReader,
    forward_response_head,
)
from egressd.protocols.memo import WholeHeads
from egressd.protocols.states import StateEnum

#: (account, user, host, port, snapshot version): what a kept upstream may be reused for.
UpstreamKey = tuple[str, str, str, int, int]


class UpstreamOwner(Protocol):
    """What a kept upstream reports to (the client connection's protocol)."""

    def upstream_data(self, upstream: KeptUpstream, data: bytes) -> None: ...

    def upstream_lost(self, upstream: KeptUpstream, exc: Exception | None) -> None: ...

    def upstream_writable(self, upstream: KeptUpstream, writable: bool) -> None: ...


class State(StateEnum):
    WAIT_HEAD = "wait-head"
    CONNECTING = "connecting"
    EXCHANGE = "exchange"
    DETACHING = "detaching"
    CLOSING = "closing"
    CLOSED = "closed"


_S = State
#: The moves of a forwarding connection (`http_forward`'s theory of operation).
TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    _S.WAIT_HEAD: frozenset({_S.CONNECTING, _S.EXCHANGE, _S.DETACHING, _S.CLOSING, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.EXCHANGE, _S.CLOSING, _S.CLOSED}),
    _S.EXCHANGE: frozenset({_S.WAIT_HEAD, _S.CLOSING, _S.CLOSED}),
    _S.DETACHING: frozenset({_S.CLOSED}),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class KeptUpstream(asyncio.Protocol):
    """One upstream connection, kept between the requests of one client connection."""

    def __init__(self, owner: UpstreamOwner, key: UpstreamKey, opened: FlowRecord) -> None:
        self.owner = owner
        self.key = key
        self.opened = opened  # the record of the request that opened it: decision, source
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True  # False once it sent bytes that belong to no response
        # The transport calls the owner's handler with no call of ours between (one a response).
        self.data_received = partial(owner.upstream_data, self)  # type: ignore[method-assign]

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def set_reading(self, reading: bool) -> None:
        if not self.closed and self.transport is not None:
            (self.transport.resume_reading if reading else self.transport.pause_reading)()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:  # replaced per instance (`__init__`)
        self.owner.upstream_data(self, data)

    def eof_received(self) -> bool:
        return False  # close: connection_lost(None) tells the owner

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        self.owner.upstream_writable(self, False)

    def resume_writing(self) -> None:
        self.owner.upstream_writable(self, True)


class Exchange:
    """One request and its response."""

    __slots__ = ("close_client", "head", "key", "record", "request_body", "request_done",
                 "response", "response_body", "response_reader", "upstream")

    def __init__(self, head: RequestHead, record: FlowRecord, key: UpstreamKey,
                 request_done: bool) -> None:
        """`request_done`: the head has no body (`not head.body.has_body`)."""
        self.head, self.record, self.key = head, record, key
        self.upstream: KeptUpstream | None = None
        self.request_body: BodyTracker | None = None
        self.request_done = request_done
        # Made with the first response bytes, unless they are a response seen before.
        self.response_reader: ResponseHeadReader | None = None
        self.response: ResponseHead | None = None  # the final head, once forwarded
        self.response_body: BodyTracker | None = None
        self.close_client = not head.keep_alive


async def open_kept_upstream(runtime: PopRuntime, owner: UpstreamOwner, exchange: Exchange,
                             identity: Identity) -> KeptUpstream:
    """The connected upstream of `exchange`, for `owner`. Raises FlowRefused or UpstreamError
    (a failed connect is one, with the authority); nothing is left open if it raises."""
    head = exchange.head
    upstream = KeptUpstream(owner, exchange.key, exchange.record)
    sock: socket.socket | None = None
    try:
        sock = await runtime.open_tcp(identity, head.host, head.port, exchange.record)
        await asyncio.get_running_loop().create_connection(lambda: upstream, sock=sock)
    except BaseException as exc:
        if upstream.transport is not None:
            upstream.close()
        elif sock is not None:
            sock.close()
        if isinstance(exc, OSError):
            raise UpstreamError(f"upstream connection to {head.authority} failed: {exc}") from exc
        raise  # FlowRefused, UpstreamError, cancelled (the client went away), or a bug
    return upstream


def whole_response(known: WholeHeads[ResponseHead], data: bytes,
                   method: str) -> tuple[ResponseHead, int] | None:
    """`data` as a response head seen before (for this request method) followed by exactly
    its body, which can then go back with no reader and no body tracker: the head and
    where it ends. None for anything else (a body cut or with more after it, a 1xx)."""
    end = data.find(b"\r\n\r\n") + 4
    if end < 4:
        return None
    response = known.get(data[:end], method)
    if response is None:
        return None
    framing, length = response.body, len(data) - end
    if ((framing.kind is BodyKind.CONTENT_LENGTH and framing.length == length)
            or (framing.kind is BodyKind.NONE and not length)):
        return response, end
    return None


#: The largest whole response a connection keeps to answer again when it repeats.
REPEAT_RESPONSE_BYTES: Final = 16 * 1024


class KnownResponses:
    """What a client connection sends back for a read that is a whole response seen before
    (`whole_response`), and the two things it remembers to do it cheaply: the last head it
    rewrote, and the last whole response it answered. A keep-alive origin repeats its
    response byte for byte (until its Date changes): the same bytes again need no search,
    no memo lookup, no rewrite and no new bytes object."""

    __slots__ = ("_heads", "_repeat", "_sent")

    def __init__(self, heads: WholeHeads[ResponseHead]) -> None:
        self._heads = heads  # shared by the connections: bytes -> parsed head
        self._sent: tuple[ResponseHead | None, str, bool, bytes] = (None, "", False, b"")
        # (the bytes read, method, via, close, head, the bytes sent, body length)
        self._repeat: tuple[bytes, str, str, bool, ResponseHead | None, bytes, int] = (
            b"", "", "", False, None, b"", 0)

    def whole(self, data: bytes, method: str, via: str,
              closing: bool) -> tuple[ResponseHead, bool, bytes, int] | None:
        """The head, whether the client connection closes after it, the bytes to send and
        the body's length; None: `data` must go through a reader. `closing`: the client
        connection closes after this response whatever its head says."""
        repeat = self._repeat
        response = repeat[4]
        if (data == repeat[0] and response is not None and repeat[1] == method and repeat[2] is via
                and repeat[3] is (closing or not response.keep_alive)):
            return response, repeat[3], repeat[5], repeat[6]
        known = whole_response(self._heads, data, method)
        if known is None:
            return None
        response, end = known
        close = closing or not response.keep_alive
        sent = self._sent
        if sent[0] is response and sent[1] is via and sent[2] is close:
            head = sent[3]
        else:
            head = forward_response_head(response, via, close=close)
            self._sent = (response, via, close, head)
        length = len(data) - end
        out = head + data[end:] if length else head
        if len(data) <= REPEAT_RESPONSE_BYTES:
            self._repeat = (data, method, via, close, response, out, length)
        return response, close, out, length


@dataclass(frozen=True, slots=True)
class Detached:
    """A connection handed back to the coroutine handler: a duplicate of the client socket
    (owned by the receiver), the head to serve next and the reader holding what follows it."""

    sock: socket.socket
    reader: RequestHeadReader
    head: RequestHead
