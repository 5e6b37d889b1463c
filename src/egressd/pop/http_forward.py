"""Absolute-form HTTP forwarding on a plain client connection, driven by callbacks.

At the first absolute-form request (``GET http://host/path``) of a plain connection,
`http_proxy.serve_http` hands the socket to a transport and a `ForwardProxyProtocol` owns
the connection. Per request it authenticates (407), asks `PopRuntime.open_tcp` for an
upstream socket (403, 502, 504) or reuses the one it keeps, and moves the messages through
the sans-I/O `RequestHeadReader`, `ResponseHeadReader` and `BodyTracker`. Each step is a
transport callback: a keep-alive request costs one read and one write per side and no
task, where the coroutine path awaited a `sock_recv`/`sock_sendall` for each.

Theory of operation. A connection is in one state at a time (moves in `http_exchange.TRANSITIONS`):

* WAIT_HEAD: between requests. With no byte of the next head yet, the idle timeout runs
  (expiry closes quietly); from its first byte the handshake timeout runs (408).
* CONNECTING: the head is authenticated; the one task the connection owns opens its
  upstream. Client bytes (body, pipelined requests) wait in the bounded backlog.
* EXCHANGE: the request body goes up while the response comes down (a 100 Continue or an
  early answer is forwarded when it arrives). The complete response ends it: one flow
  record, then the next head from the backlog (pipelining). An answer before the end of
  the request body also ends the client connection (where would the next request start?).
* DETACHING: a CONNECT, or a request for the PoP itself. Once every byte written to the
  client has left, a duplicate of the socket, the head and the reader (holding the bytes
  after it) go back to the coroutine handler, which splices a CONNECT as for a first
  request; this transport is dropped.
* CLOSING: the last bytes (an error page, a `Connection: close` answer) are flushed.

The upstream connection is kept for the next request with the same key (account, user,
host, port, snapshot version): never shared across accounts or source addresses. A client
that sends the very bytes of its last request again, when nothing they depend on changed
(snapshot, throttle, kept upstream), starts the same exchange with no parse or check; an
origin that repeats its last whole response gets the same answer (`KnownResponses`). A full
write buffer on one side pauses reading the other (the transports' pause/resume_writing).

What it does not know: TLS (the TLS listener keeps the coroutine path, `StreamIO`),
tunnels (handed back, see DETACHING), and HTTP syntax (the readers know it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Final, cast

from egressd.model.snapshot import Snapshot
from egressd.pop.flowlog import FlowRecord
from egressd.pop.http_answers import (
    bad_request,
    failure_response,
    log_auth_failure,
    protocol_error_response,
)
from egressd.pop.http_exchange import (
    TRANSITIONS,
    Detached,
    Exchange,
    KeptUpstream,
    KnownResponses,
    State,
    open_kept_upstream,
)
from egressd.pop.identity import Identity
from egressd.pop.runtime import FlowRefused, PopRuntime, tcp_record
from egressd.pop.upstream import UpstreamError
from egressd.protocols.http1 import (
    BodyTracker,
    HttpError,
    RequestHead,
    RequestHeadReader,
    ResponseHead,
    ResponseHeadReader,
    forward_head,
    forward_response_head,
    proxy_auth_required,
    simple_response,
)
from egressd.protocols.memo import WholeHeads

log = logging.getLogger("egressd.pop.http")

#: Client bytes held ahead of the exchange (a body while connecting, pipelined requests)
#: before the client stops being read.
BACKLOG_LIMIT: Final = 256 * 1024


# Why reading the client is paused (a bit each; reading resumes when none is left).
_PAUSE_UPSTREAM_FULL: Final = 1
_PAUSE_BACKLOG: Final = 2
_PAUSE_DETACH: Final = 4
#: States in which bytes may still be written to the client.
_WRITABLE: Final = frozenset({State.WAIT_HEAD, State.CONNECTING, State.EXCHANGE})

#: Request heads that were all of a read, by those bytes and the options they were read
#: under; response heads that began a response, by their bytes and the request method.
_WHOLE_REQUESTS: WholeHeads[RequestHead] = WholeHeads()
_WHOLE_RESPONSES: WholeHeads[ResponseHead] = WholeHeads()


# --- the forwarding protocol -----------------------------------------------------------


class ForwardProxyProtocol(asyncio.Protocol):
    """Owns a plain client connection that carries absolute-form requests (module doc)."""

    def __init__(self, runtime: PopRuntime, sock: socket.socket, peer: tuple[str, int],
                 reader: RequestHeadReader, first_head: RequestHead) -> None:
        self.runtime, self.sock, self.peer, self.reader = runtime, sock, peer, reader
        self.client = f"{peer[0]}:{peer[1]}"  # as flow records write it
        self.loop = asyncio.get_running_loop()
        self.first_head: RequestHead | None = first_head
        self.transport: asyncio.Transport | None = None
        self.state = State.WAIT_HEAD
        self.exchange: Exchange | None = None
        self.upstream: KeptUpstream | None = None
        self.backlog = bytearray()
        self.head_pending = False  # bytes of a request head are buffered in the reader
        self.client_eof = self.drain_requested = self.transport_lost = False
        self.client_writable = True
        self.paused = 0  # _PAUSE_* bits
        self.detach_head: RequestHead | None = None
        self.detached: Detached | None = None
        self.opening: asyncio.Task[None] | None = None
        self.done: asyncio.Future[Detached | None] = self.loop.create_future()
        # One lazily re-armed timer: `deadline` moves freely, the timer is only re-armed
        # when the deadline comes before it. In CONNECTING/EXCHANGE it checks `active`.
        self.deadline = self.timer_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.active = False
        # The last request rewrite sent, by the parsed head it came from (the memo returns the
        # same head object for the same bytes): a keep-alive client repeats its request, so
        # most exchanges rewrite nothing. `responses` does the same for the responses.
        self.sent_request: tuple[RequestHead | None, str, bytes] = (None, "", b"")
        self.responses = KnownResponses(_WHOLE_RESPONSES)
        # The identity of the last request head authenticated here, and the snapshot it was
        # checked under. The same head object (a known head: the same bytes, credentials
        # included) under the same snapshot, from a source with no failures counted, is the
        # same identity: `authenticate` is a pure function of the snapshot and the
        # credentials, past the throttle. A new snapshot (a device revoked) checks anew.
        self.known_identity: tuple[RequestHead | None, Snapshot | None, Identity | None] = (None, None, None)
        # A keep-alive client repeats the very bytes of its request: the last ones that went
        # up a kept upstream, their head and that upstream (`_repeat_request`).
        self.repeat_request: tuple[bytes, RequestHead | None, KeptUpstream | None] = (b"", None, None)
        self.repeat_record: FlowRecord | None = None  # the last repeated exchange's

    # -- lifecycle ----------------------------------------------------------------------

    async def wait_closed(self) -> Detached | None:
        """Wait until the transport and the upstream task are gone; the hand-back, if any."""
        return await asyncio.shield(self.done)

    def close_when_idle(self) -> None:
        """The PoP drains: close now if idle, else after the exchange in progress."""
        self.drain_requested = True
        if self.state is State.WAIT_HEAD and not self.head_pending:
            self._close()

    def abort(self, reason: str = "shutdown") -> None:
        """Drop the connection now (PoP shutdown); the exchange in progress is logged."""
        self._interrupt(reason, "PoP shutting down" if reason == "shutdown" else reason)
        self._stop_upstream()
        if self.transport is not None and self.state is not State.CLOSED:
            if self.state in _WRITABLE:
                self._goto(State.CLOSING)
            self.transport.abort()

    def _goto(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:  # a bug in this module, not bad input
            raise RuntimeError(f"forward connection: no transition {self.state} -> {state}")
        self.state = state

    def _maybe_done(self) -> None:
        if self.transport_lost and self.opening is None and not self.done.done():
            if self.timer is not None:
                self.timer.cancel()
            self.done.set_result(self.detached)

    def _close(self) -> None:
        """Flush what was written to the client, then close. Records are already written."""
        if self.state not in _WRITABLE:  # closing, closed, or handing back
            return
        self._goto(State.CLOSING)
        self._stop_upstream()
        self.backlog.clear()
        assert self.transport is not None
        self.transport.close()

    def _stop_upstream(self) -> None:
        self._drop_upstream()
        if self.opening is not None:
            self.opening.cancel()

    def _interrupt(self, closed_by: str, error: str) -> None:
        """Write the record of an exchange that cannot complete (a side went away)."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            record = exchange.record
            record.outcome, record.closed_by, record.error = "connection-error", closed_by, error
            self.runtime.finish(record)

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
            self._resume(_PAUSE_UPSTREAM_FULL)

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and self.state is not State.CLOSED:
                self.transport.resume_reading()

    # -- timer --------------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        self.deadline = deadline
        if self.timer is None or deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self._guarded(self._timer_fired, self.state, self.loop.time())

    def _timer_fired(self, state: State, now: float) -> None:
        if state in (State.CLOSING, State.CLOSED):
            return
        if now < self.deadline:
            self._arm(self.deadline)
        elif state is State.WAIT_HEAD:
            if self.head_pending:
                self._write(simple_response(408, "Request Timeout", b"request header timeout\n"))
            self._close()
        elif state is State.DETACHING:  # the client does not read what it was sent
            self.abort("client-error")
        elif self.active or state is State.CONNECTING:  # connect_timeout bounds CONNECTING
            self.active = False
            self._arm(now + self.runtime.options.idle_timeout)
        elif self.exchange is not None and self.exchange.response is None:  # EXCHANGE, idle
            self._fail(UpstreamError(f"{self.exchange.head.authority} sent no response within "
                                     f"{self.runtime.options.idle_timeout:g} s", status=504))
        else:
            self._interrupt("idle-timeout", f"no data either way for {self.runtime.options.idle_timeout:g} s")
            self._close()

    # -- client side (asyncio callbacks) ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        head, self.first_head = self.first_head, None
        self._guarded(self._next_requests, head)

    def data_received(self, data: bytes) -> None:
        state = self.state
        exchange = self.exchange
        if state is State.WAIT_HEAD:
            if self.head_pending:
                self.reader.feed(data)
                self._guarded(self._next_requests, None)
                return
            # The first bytes of a head: often a whole head sent before (a keep-alive
            # client repeats its request), which needs no reader.
            if data == self.repeat_request[0] and self._repeat_request():
                return
            head = _WHOLE_REQUESTS.get(data, self.runtime.options)
            if head is not None:
                try:  # `_guarded`, inline (one call less per request)
                    self._on_head(head, read=False)
                except Exception as exc:
                    self._step_failed(exc)
                exchange = self.exchange
                if (exchange is not None and exchange.head is head and exchange.request_done
                        and exchange.upstream is not None and self.state is State.EXCHANGE):
                    self.repeat_request = (data, head, exchange.upstream)  # a kept upstream
                return
            self.reader.feed(data)
            self.head_pending = True
            self._arm(self.loop.time() + self.runtime.options.handshake_timeout)
            self._guarded(self._next_requests, None, data)
        elif exchange is not None and state is State.EXCHANGE and not exchange.request_done:
            self.active = True
            self._guarded(self._request_data, data)
        elif state is State.CONNECTING or state is State.EXCHANGE:
            self._to_backlog(data)
        # CLOSING: nothing more is read. DETACHING: reading is paused.

    def eof_received(self) -> bool:
        self.client_eof = True
        exchange = self.exchange
        if self.state is State.WAIT_HEAD:
            self._guarded(self._next_requests, None)
        elif exchange is not None and exchange.request_body is not None and not exchange.request_done:
            self._guarded(exchange.request_body.eof)  # raises: the body is incomplete
        return True  # keep the write side open for the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport_lost = True
        if self.state is not State.CLOSED:
            self._interrupt("client", str(exc) if exc else "client closed the connection")
            self._goto(State.CLOSED)
        self._stop_upstream()
        self._maybe_done()

    def pause_writing(self) -> None:
        self.client_writable = False
        if self.upstream is not None:
            self.upstream.set_reading(False)

    def resume_writing(self) -> None:
        self.client_writable = True
        if self.state is State.DETACHING:
            self._guarded(self._hand_back)
        elif self.upstream is not None:
            self.upstream.set_reading(True)

    def _guarded(self, step: Callable[..., None], *args: object) -> None:
        """Run a step; protocol and upstream errors end the exchange with their answer."""
        try:
            step(*args)
        except Exception as exc:
            self._step_failed(exc)

    def _step_failed(self, exc: Exception) -> None:
        if isinstance(exc, HttpError | UpstreamError):
            self._fail(exc)
        else:  # a bug must cost one connection, never the PoP
            log.error("unexpected error in forward connection from %s:%s", *self.peer, exc_info=exc)
            self.abort("internal-error")

    def _write(self, data: bytes) -> None:
        if self.transport is not None and self.state in _WRITABLE:
            self.transport.write(data)

    def _to_backlog(self, data: bytes) -> None:
        self.backlog += data
        if len(self.backlog) >= BACKLOG_LIMIT:
            self._pause(_PAUSE_BACKLOG)

    # -- requests -----------------------------------------------------------------------

    def _repeat_request(self) -> bool:
        """The client sent again the bytes of the request last forwarded on the kept
        upstream: if nothing it depends on changed (the snapshot, the throttle, the
        upstream, `via`), start the same exchange with no parse, check or rewrite. False:
        take the general path. What `_on_head` and `_begin` do, for this one case."""
        _, head, upstream = self.repeat_request
        runtime = self.runtime
        known, sent = self.known_identity, self.sent_request
        identity = known[2]
        if (upstream is not self.upstream or upstream is None or upstream.closed or not upstream.reusable
                or head is None or known[0] is not head or identity is None or sent[0] is not head
                or known[1] is not runtime.state.snapshot or sent[1] is not runtime.options.via
                or self.peer[0] in runtime.auth_throttle.failing or upstream.transport is None):
            return False
        # With no flow log and no sink, nobody reads a record but `finish`, for its counts:
        # the last repeated exchange's record (finished, so counted already) serves again,
        # its identity, counts and outcome reset; its flow id and start, which only a log
        # line shows, stay. A new record costs more than the rest of a repeat.
        flowlog, record = runtime.flowlog, self.repeat_record
        if record is None or flowlog.enabled or flowlog.sinks:
            record = self.repeat_record = tcp_record(runtime.code, self.client, identity)
        else:
            record.account, record.user, record.device = identity.account, identity.user, identity.device
            record.bytes_up = record.bytes_down = 0
            record.outcome, record.closed_by, record.error = "ok", None, None
        opened = upstream.opened
        record.port, record.decision, record.destination = head.port, opened.decision, opened.destination
        record.hostname, record.local_address = opened.hostname, opened.local_address
        exchange = self.exchange = Exchange(head, record, upstream.key, True)  # repeats have no body
        exchange.upstream = upstream
        self.state = State.EXCHANGE  # WAIT_HEAD -> EXCHANGE, as `_begin` moves
        self.active = True
        upstream.transport.write(sent[2])
        return True

    def _next_requests(self, head: RequestHead | None, whole: bytes | None = None) -> None:
        """Serve the heads the reader holds, one exchange at a time. `whole`: all the
        reader holds, fed to an empty reader (remembered if it is exactly one head)."""
        while self.state is State.WAIT_HEAD:
            if head is None:
                reader = self.reader
                try:
                    head = reader.next_head()
                except HttpError as error:
                    self._bad_request(error)
                    return
                if whole is not None and head is not None and not reader.buffered:
                    _WHOLE_REQUESTS.put(whole, self.runtime.options, head)
                whole = None
                if head is None:
                    if self.client_eof and self.head_pending:
                        self._bad_request(HttpError(400, "connection closed in the middle of a request head"))
                    elif self.client_eof or (not self.head_pending and self.drain_requested):
                        self._close()
                    return
            self.head_pending = False
            self._on_head(head)
            head = None

    def _bad_request(self, error: HttpError) -> None:
        self._write(bad_request(self.runtime, self.peer, error))
        self._close()

    def _on_head(self, head: RequestHead, *, read: bool = True) -> None:
        """`read`: the head came from the reader (False: it was known, the reader is empty)."""
        if head.is_connect or head.is_origin_form:
            self._detach(head)
            return
        runtime = self.runtime
        snapshot = runtime.state.snapshot
        known = self.known_identity
        if known[0] is head and known[1] is snapshot and self.peer[0] not in runtime.auth_throttle.failing:
            identity: Identity | None = known[2]  # what `authenticate` says again (see __init__)
        else:
            identity = runtime.authenticate(head.proxy_credentials, self.peer)
            if identity is not None:
                self.known_identity = (head, snapshot, identity)
        if identity is None:
            log_auth_failure(runtime, self.peer, head)
            keep = head.keep_alive and not head.body.has_body
            self._write(proxy_auth_required(close=not keep))
            if not keep:
                self._close()
                return
            rest = self.reader.remainder()  # pipelined heads: keep them
            self.reader.feed(rest)
            self.head_pending = bool(rest)
            options = runtime.options
            self._arm(self.loop.time() + (options.handshake_timeout if rest else options.idle_timeout))
            return
        record = tcp_record(runtime.code, self.client, identity)
        record.destination = head.host
        key = (identity.account, identity.user, head.host, head.port, snapshot.version)
        exchange = Exchange(head, record, key, not head.body.has_body)
        self.exchange = exchange
        if read:
            rest = self.reader.remainder()
            if rest:
                self.backlog += rest
        upstream = self.upstream
        if upstream is not None and (upstream.key != key or upstream.closed or not upstream.reusable):
            self._drop_upstream()  # never reused for another account, user, host or snapshot
            upstream = None
        if upstream is not None:  # the record says what the kept connection was opened with
            opened = upstream.opened
            record.port, record.decision, record.destination = head.port, opened.decision, opened.destination
            record.hostname, record.local_address = opened.hostname, opened.local_address
            self._begin(exchange, upstream)
            return
        self._goto(State.CONNECTING)
        self.active = True
        self.opening = self.loop.create_task(self._open(exchange, identity))
        self.opening.add_done_callback(self._opened)

    async def _open(self, exchange: Exchange, identity: Identity) -> None:
        try:
            upstream = await open_kept_upstream(self.runtime, self, exchange, identity)
        except (FlowRefused, UpstreamError) as exc:
            if self.exchange is exchange:
                self._fail(exc)
            return
        if self.exchange is not exchange or self.state is not State.CONNECTING:
            upstream.close()  # the client went away meanwhile
            return
        self.upstream = upstream
        if not self.client_writable:
            upstream.set_reading(False)
        self._guarded(self._begin, exchange, upstream)

    def _opened(self, task: asyncio.Task[None]) -> None:
        self.opening = None
        if not task.cancelled() and task.exception() is not None:
            log.error("unexpected error opening an upstream for %s:%s", *self.peer,
                      exc_info=task.exception())
            self.abort("internal-error")
        self._maybe_done()

    def _begin(self, exchange: Exchange, upstream: KeptUpstream) -> None:
        if self.state is not State.WAIT_HEAD and self.state is not State.CONNECTING:
            self._goto(State.EXCHANGE)  # raises: `_goto`'s check, inline (once per request)
        self.state = State.EXCHANGE
        self.active = True
        options = self.runtime.options
        if self.timer is None:  # the first request: nothing armed the timer yet
            self._arm(self.loop.time() + options.idle_timeout)
        exchange.upstream = upstream
        head, via = exchange.head, options.via
        sent = self.sent_request
        if sent[0] is head and sent[1] is via:
            out = sent[2]
        else:
            out = forward_head(head, via)
            self.sent_request = (head, via, out)
        transport = upstream.transport  # `upstream.write`, inline
        if transport is not None and not upstream.closed:
            transport.write(out)
        if exchange.request_done:
            return
        exchange.request_body = BodyTracker(exchange.head.body)
        if self.backlog:
            data = bytes(self.backlog)
            self.backlog.clear()
            self._resume(_PAUSE_BACKLOG)
            self._request_data(data)
        if self.client_eof and not exchange.request_done and self.exchange is exchange:
            exchange.request_body.eof()  # raises: the body is incomplete

    def _request_data(self, data: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None and exchange.request_body is not None and exchange.upstream is not None
        tracker = exchange.request_body
        taken = tracker.feed(data)
        if taken:
            exchange.upstream.write(data if taken == len(data) else data[:taken])
            exchange.record.bytes_up += taken
        if tracker.done:
            exchange.request_done = True
            if taken < len(data):
                self._to_backlog(data[taken:])

    # -- responses ----------------------------------------------------------------------

    def upstream_data(self, upstream: KeptUpstream, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or exchange.upstream is not upstream or self.state is not State.EXCHANGE:
            # Bytes from an idle kept upstream belong to no request: it is out of step.
            if upstream is self.upstream:
                self._drop_upstream()
            upstream.close()
            return
        self.active = True
        if exchange.response_body is None:
            try:  # `_guarded`, inline (one call less per response)
                if exchange.response_reader is None:  # a whole response seen before?
                    runtime = self.runtime
                    known = self.responses.whole(data, exchange.head.method, runtime.options.via,
                                                 exchange.close_client or self.drain_requested or runtime.draining)
                    if known is not None:
                        response, close, out, length = known
                        exchange.response, exchange.close_client = response, close
                        if self.transport is not None and self.state in _WRITABLE:  # `_write`, inline
                            self.transport.write(out)
                        exchange.record.bytes_down += length
                        self._finish_exchange(exchange)
                        return
                self._response_head_data(exchange, upstream, data)
            except Exception as exc:
                self._step_failed(exc)
        else:
            self._guarded(self._response_body_data, exchange, upstream, data)

    def _response_head_data(self, exchange: Exchange, upstream: KeptUpstream, data: bytes) -> None:
        reader = exchange.response_reader
        fresh = reader is None
        if reader is None:  # (`upstream_data` tried `responses.whole` first)
            reader = exchange.response_reader = ResponseHeadReader(exchange.head.method)
        reader.feed(data)
        via = self.runtime.options.via
        out: list[bytes] = []
        while True:
            response = reader.next_head()
            if response is None:
                if out:
                    self._write(b"".join(out))  # 1xx heads
                return
            if fresh and not out and not response.is_interim:  # the first head of `data`
                end = len(data) - reader.buffered
                if data.find(b"\r\n\r\n") + 4 == end:  # no empty lines before it
                    _WHOLE_RESPONSES.put(data[:end], exchange.head.method, response)
            close = (exchange.close_client or not response.keep_alive
                     or self.drain_requested or self.runtime.draining)
            out.append(forward_response_head(response, via, close=close))
            if not response.is_interim:
                break
        exchange.response_body = BodyTracker(response.body, error_status=502)
        exchange.close_client = close
        self._response_body_data(exchange, upstream, reader.remainder(), response, b"".join(out))

    def _response_body_data(self, exchange: Exchange, upstream: KeptUpstream, data: bytes,
                            final: ResponseHead | None = None, head: bytes = b"") -> None:
        tracker = exchange.response_body
        assert tracker is not None
        # With the final head: its segment's body bytes are checked before the head goes out,
        # so bad framing there is still answered 502 (`exchange.response` means "head sent").
        taken = tracker.feed(data) if data else 0
        if final is not None:
            exchange.response = final
        if taken or head:  # one write: uvloop's writelines costs about three writes here
            body = data if taken == len(data) else data[:taken]
            self._write(head + body if head else body)
            exchange.record.bytes_down += taken
        if tracker.done:
            if taken < len(data):
                upstream.reusable = False  # bytes past the response: out of step
            self._finish_exchange(exchange)

    def upstream_lost(self, upstream: KeptUpstream, exc: Exception | None) -> None:
        if upstream is not self.upstream:
            return  # one this connection dropped already
        self.upstream = None
        self._resume(_PAUSE_UPSTREAM_FULL)
        exchange = self.exchange
        if exchange is None or exchange.upstream is not upstream:
            return  # a kept upstream closed while idle: the next request opens a new one
        if exc is not None:
            self._interrupt("upstream", str(exc) or type(exc).__name__)
            self._close()
        elif exchange.response_body is None:
            self._fail(UpstreamError("upstream closed the connection before responding"))
        else:  # fine for until-close; an incomplete body raises 502
            self._guarded(exchange.response_body.eof)
            if self.exchange is exchange:
                self._finish_exchange(exchange)

    def upstream_writable(self, upstream: KeptUpstream, writable: bool) -> None:
        if upstream is self.upstream:
            (self._resume if writable else self._pause)(_PAUSE_UPSTREAM_FULL)

    def _finish_exchange(self, exchange: Exchange) -> None:
        self.exchange = None
        record = exchange.record
        record.closed_by = "client" if not exchange.head.keep_alive else None
        self.runtime.finish(record)
        response = exchange.response
        upstream = exchange.upstream
        assert response is not None and upstream is not None
        if not (response.keep_alive and exchange.request_done and upstream.reusable):
            self._drop_upstream()
        if exchange.close_client or not exchange.request_done or self.drain_requested:
            self._close()
        elif self.backlog:  # pipelined requests
            self._goto(State.WAIT_HEAD)
            self.reader.feed(self.backlog)
            self.backlog.clear()
            self._resume(_PAUSE_BACKLOG)
            self.head_pending = True
            self._arm(self.loop.time() + self.runtime.options.handshake_timeout)
            self._next_requests(None)
        elif self.client_eof:  # half-closed, and nothing more came before
            self._close()
        else:  # the reader is empty: nothing to parse until data_received
            if self.state is not State.EXCHANGE:
                self._goto(State.WAIT_HEAD)  # raises: `_goto`'s check, inline
            self.state = State.WAIT_HEAD
            deadline = self.loop.time() + self.runtime.options.idle_timeout
            if self.timer is not None and deadline >= self.timer_at:
                self.deadline = deadline  # `_arm`'s common case, inline
            else:
                self._arm(deadline)

    def _fail(self, error: HttpError | UpstreamError | FlowRefused) -> None:
        """End the exchange with its answer (when no response head went out yet) and close."""
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            self._close()
            return
        record = exchange.record
        answer = (protocol_error_response(record, error) if isinstance(error, HttpError)
                  else failure_response(record, error))
        self.runtime.finish(record)
        if exchange.response is None:
            self._write(answer)
        self._close()

    # -- hand-back ----------------------------------------------------------------------

    def _detach(self, head: RequestHead) -> None:
        """A CONNECT or a local request: the coroutine handler takes the connection back."""
        self._goto(State.DETACHING)
        self._pause(_PAUSE_DETACH)
        self._drop_upstream()
        self.detach_head = head
        self._arm(self.loop.time() + self.runtime.options.handshake_timeout)
        assert self.transport is not None
        if self.transport.get_write_buffer_size() == 0:
            self._hand_back()
        else:  # resume_writing comes when the buffer is empty
            self.transport.set_write_buffer_limits(high=0)

    def _hand_back(self) -> None:
        head = self.detach_head
        assert head is not None and self.transport is not None
        try:
            duplicate = self.sock.dup()
        except OSError:
            self.abort("client-error")
            return
        duplicate.setblocking(False)
        self.detached = Detached(duplicate, self.reader, head)
        self._goto(State.CLOSED)
        self.transport.abort()  # closes only this transport's descriptor
