"""The upstream side of callback forwarding: a kept upstream connection and one exchange.

A `KeptUpstream` is an asyncio protocol that tells its owner (the client connection's
`ForwardProxyProtocol`) everything that happens; it is reused only for the same
`UpstreamKey` (account, user, host, port, snapshot version): never shared across accounts
or source addresses. An `Exchange` is one request and its response; `whole_response` tells whether a read is
a whole response seen before. A `Detached` is a connection handed back to the coroutine
handler.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Protocol, cast

from egressd.pop.flowlog import FlowRecord
from egressd.protocols.http1 import (
    BodyKind,
    BodyTracker,
    RequestHead,
    RequestHeadReader,
    ResponseHead,
    ResponseHeadReader,
)
from egressd.protocols.memo import WholeHeads

#: (account, user, host, port, snapshot version): what a kept upstream may be reused for.
UpstreamKey = tuple[str, str, str, int, int]


class UpstreamOwner(Protocol):
    """What a kept upstream reports to (the client connection's protocol)."""

    def upstream_data(self, upstream: KeptUpstream, data: bytes) -> None: ...

    def upstream_lost(self, upstream: KeptUpstream, exc: Exception | None) -> None: ...

    def upstream_writable(self, upstream: KeptUpstream, writable: bool) -> None: ...


class KeptUpstream(asyncio.Protocol):
    """One upstream connection, kept between the requests of one client connection."""

    def __init__(self, owner: UpstreamOwner, key: UpstreamKey, opened: FlowRecord) -> None:
        self.owner = owner
        self.key = key
        self.opened = opened  # the record of the request that opened it: decision, source
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True  # False once it sent bytes that belong to no response

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

    def data_received(self, data: bytes) -> None:
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

    def __init__(self, head: RequestHead, record: FlowRecord, key: UpstreamKey) -> None:
        self.head, self.record, self.key = head, record, key
        self.upstream: KeptUpstream | None = None
        self.request_body: BodyTracker | None = None
        self.request_done = not head.body.has_body
        # Made with the first response bytes, unless they are a response seen before.
        self.response_reader: ResponseHeadReader | None = None
        self.response: ResponseHead | None = None  # the final head, once forwarded
        self.response_body: BodyTracker | None = None
        self.close_client = not head.keep_alive


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


@dataclass(frozen=True, slots=True)
class Detached:
    """A connection handed back to the coroutine handler: a duplicate of the client socket
    (owned by the receiver), the head to serve next and the reader holding what follows it."""

    sock: socket.socket
    reader: RequestHeadReader
    head: RequestHead
