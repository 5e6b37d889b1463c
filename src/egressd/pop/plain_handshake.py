"""The handshake of a plain connection (HTTP CONNECT or SOCKS5 CONNECT), driven by callbacks.

The plain listener hands every accepted socket to a `PlainHandshake`. It reads with one
reader registration on the PoP's `Poller` (`pop/poller.py`), parses with the sans-I/O machines (`RequestHeadReader`,
`Socks5Server`), answers the small handshake replies with a non-blocking send, and
connects upstream. When that is done it hands the (client, upstream) pair to a
`SpliceRelay`, whose reader replaces the handshake's on the client socket. A tunnel to an
address literal that connects locally (the common case) costs no task and no coroutine:
the connect is a writer callback on the socket `upstream.start_connect` made, or nothing
at all when the kernel finished it inside `connect` (a peer on this host).

Theory of operation. A handshake is in one state at a time:

* SNIFF: nothing received yet. The first byte decides: 0x05 is SOCKS5, anything else HTTP.
* HTTP_HEAD / SOCKS: reading the request. The handshake timeout (one timeout from the
  accept) closes a client that is too slow: with a 408 once HTTP bytes came, quietly else.
* CONNECTING: the request is authenticated and allowed; the upstream connect is in
  progress, under the connect timeout. A connect to an address literal follows a plan
  (`PopRuntime.direct_plan`: address and decision, remembered for the snapshot) and takes
  its flow slot, and the socket made for its source address after the previous reply
  (`upstream.SpareSockets`); its flow record is made once the reply has gone, off the
  client's path, or at once if the connect fails or has to wait. The next spare is made
  after the reply too (or once the connect waits). The client socket is not read
  meanwhile: bytes it sends wait in the kernel for the relay.
* OPENING: the connect has to await (see below): a task of the listener runs
  `PopRuntime.open_tcp`, then the handshake goes on as from CONNECTING.
* DONE: handed to a relay, to a coroutine, or closed. Nothing of the handshake remains.

Everything else goes to the coroutine handlers, with what was parsed so far: a request
that is not a CONNECT (absolute-form forwarding, requests for the PoP itself), a CONNECT
without valid credentials (407 and the keep-alive loop), UDP ASSOCIATE and unsupported
SOCKS5 commands, a name to resolve, more than one candidate address, a backbone or
private-route path, early tunnel bytes, and a reply the socket would not take at once.

What it does not know: TLS (the TLS listener keeps the coroutine path), HTTP and SOCKS5
syntax (the readers know it), decisions (`PopRuntime`), and sockets upstream
(`pop/upstream.py` makes them).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any, Final, Protocol

from egressd.decide import Decision
from egressd.model.addresses import IPAddress
from egressd.pop.admission import PeerSet
from egressd.pop.client_io import RECV_SIZE, SocketIO, guarded, start_tunnel, tunnel_started
from egressd.pop.deadlines import Entry
from egressd.pop.flowlog import FlowRecord
from egressd.pop.http_answers import bad_request, failure_response, start_record
from egressd.pop.identity import Identity
from egressd.pop.relay import SpliceRelay
from egressd.pop.runtime import DirectPlan, FlowRefused, PopRuntime
from egressd.pop.socks_proxy import log_auth_failure, serve_request
from egressd.pop.upstream import (
    UpstreamError,
    bound_address,
    connect_outcome,
    connect_timed_out,
    start_connect,
)
from egressd.protocols.http1 import (
    HttpError,
    RequestHead,
    RequestHeadReader,
    connect_established,
    simple_response,
)
from egressd.protocols.memo import WholeHeads
from egressd.protocols.socks5 import (
    Command,
    CredentialsReceived,
    ProtocolFailure,
    ReplyCode,
    RequestReceived,
    Socks5Server,
)
from egressd.protocols.states import StateEnum

log = logging.getLogger("egressd.pop.handshake")

SOCKS_VERSION: Final = 0x05


class State(StateEnum):
    SNIFF = "sniff"
    HTTP_HEAD = "http-head"
    SOCKS = "socks"
    CONNECTING = "connecting"
    OPENING = "opening"
    DONE = "done"


_READING: Final = frozenset({State.SNIFF, State.HTTP_HEAD, State.SOCKS})

#: CONNECT heads that were the whole of a connection's first read, and the options they
#: were read under: the same bytes again need no reader (parsing is a pure function of
#: them).
_CONNECT_HEADS: WholeHeads[RequestHead] = WholeHeads()


class HandshakeOwner(Protocol):
    """What a handshake needs of its listener."""

    runtime: PopRuntime
    handshakes: PeerSet[PlainHandshake]

    def spawn(self, coro: Coroutine[Any, Any, None], *owned: socket.socket) -> None:
        """Run `coro` as a task the listener owns (cancelled and awaited on close); the
        `owned` sockets are closed if it is cancelled."""

    def resume_http(self, io: SocketIO, reader: RequestHeadReader, head: RequestHead) -> Coroutine[Any, Any, None]:
        """The coroutine path for a connection whose first head was read here."""


class PlainHandshake:
    """One accepted plain connection until it is a tunnel, a coroutine's, or closed."""

    __slots__ = ("address", "connect_started", "head_reader", "identity", "local_address",
                 "owner", "peer", "planned", "poller", "reading", "record", "reply", "runtime",
                 "slot", "sniff", "sock", "socks", "state", "timer", "upstream", "writing")

    def __init__(self, owner: HandshakeOwner, sock: socket.socket,
                 peer: tuple[str, int], *, sniff: bool) -> None:
        self.owner = owner
        self.runtime = owner.runtime
        self.poller = owner.runtime.poller
        self.sock = sock
        self.peer = peer
        self.sniff = sniff
        self.state = State.SNIFF
        self.reading = False
        self.writing = False
        self.timer: Entry | None = None  # in the runtime's `Deadlines`
        self.head_reader: RequestHeadReader | None = None
        self.socks: Socks5Server | None = None
        self.identity: Identity | None = None
        self.record: FlowRecord | None = None
        self.upstream: socket.socket | None = None
        self.address: IPAddress | None = None
        self.reply = b""
        self.connect_started = 0.0
        # A planned connect (`_connect`): identity, port and plan, its flow slot, and its
        # local address, until `_record` makes its record.
        self.planned: tuple[Identity, int, DirectPlan] | None = None
        self.slot: tuple[str, str] | None = None
        self.local_address: str | None = None

    def start(self) -> None:
        self.owner.handshakes.add(self)
        # The request is often there already: read before registering, and before the
        # handshake timeout, which a request read whole at once never needs.
        self._on_readable()
        if self.state in _READING:
            self.timer = self.runtime.deadlines.add(self.runtime.options.handshake_timeout, self._on_timeout)
            if not self.reading:
                self.reading = True
                self.poller.add_reader(self.sock.fileno(), self._on_readable)

    # --- reading the request ----------------------------------------------------------

    def _on_readable(self) -> None:
        if self.state not in _READING:
            # Connecting: the relay reads what the client sends meanwhile. The reader
            # stays registered until then (the relay's replaces it) unless this happens.
            self._stop_reading()
            return
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            if self.state is State.SNIFF:
                if not data:
                    self._close()
                    return
                if self.sniff and data[0] == SOCKS_VERSION:
                    self.state = State.SOCKS
                    self.socks = Socks5Server()
                else:
                    self.state = State.HTTP_HEAD
                    if self._known_connect(data):
                        return
                    self.head_reader = self.runtime.options.head_reader()
                    self._http_received(data, whole=True)
                    return
            if self.state is State.HTTP_HEAD:
                self._http_received(data)
            elif self.state is State.SOCKS:
                self._socks_received(data)
        except Exception:  # a bug must cost one connection, never the PoP
            log.exception("unexpected error serving %s:%s", self.peer[0], self.peer[1])
            self._close()

    def _known_connect(self, data: bytes) -> bool:
        """Go on at once if `data` is exactly a CONNECT head seen before under these options
        (the reader's verdict on the same bytes cannot differ) from a device that
        authenticates; False: read it with a reader."""
        runtime = self.runtime
        head = _CONNECT_HEADS.get(data, runtime.options)
        if head is None:
            return False
        identity = runtime.authenticate(head.proxy_credentials, self.peer, count_failure=False)
        if identity is None:
            return False  # the reader path answers the 407 (and counts it)
        self.reply = connect_established()
        self._connect(identity, head.host, head.port)
        return True

    def _http_received(self, data: bytes, *, whole: bool = False) -> None:
        """`whole`: `data` is all a fresh reader was fed (a CONNECT head that is all of it
        is remembered for `_known_connect`)."""
        reader = self.head_reader
        assert reader is not None
        runtime = self.runtime
        if not data:  # bytes came before (the first one chose HTTP): a head was cut short
            self._http_error(HttpError(400, "connection closed in the middle of a request head"))
            return
        reader.feed(data)
        try:
            head = reader.next_head()
        except HttpError as error:
            self._http_error(error)
            return
        if head is None:
            return
        # The coroutine path answers (and counts) a failure: not counted here too.
        identity = (runtime.authenticate(head.proxy_credentials, self.peer, count_failure=False)
                    if head.is_connect else None)
        if whole and identity is not None and not reader.buffered:
            _CONNECT_HEADS.put(data, runtime.options, head)
        if identity is None:  # not a CONNECT, or a 407 to answer: the coroutine path
            io = self._socket_io()
            if io is not None:
                self._detach()
                self.owner.spawn(self.owner.resume_http(io, reader, head))
            return
        self.reply = connect_established()
        self._connect(identity, head.host, head.port)

    def _http_error(self, error: HttpError) -> None:
        self._send(bad_request(self.runtime, self.peer, error))
        self._close()

    def _socks_received(self, data: bytes) -> None:
        server = self.socks
        assert server is not None
        runtime = self.runtime
        if not data:
            self._close()
            return
        events = server.receive_data(data)
        while True:
            out = server.data_to_send()
            if out and not self._send(out):
                self._close()
                return
            if not events:
                return
            event = events.pop(0)
            if isinstance(event, ProtocolFailure):
                runtime.metrics.protocol_errors.labels(runtime.code, "socks5").inc()
                log.info("bad SOCKS5 input from %s:%s: %s", self.peer[0], self.peer[1], event.message)
                self._send(server.data_to_send())
                self._close()
                return
            if isinstance(event, CredentialsReceived):
                self.identity = runtime.authenticate((event.username, event.password), self.peer)
                if self.identity is None:
                    log_auth_failure(runtime, self.peer, event.username)
                    self._send(server.reject_credentials())
                    self._close()
                    return
                if not self._send(server.accept_credentials()):
                    self._close()
                    return
                events.extend(server.receive_data(b""))
            elif isinstance(event, RequestReceived):
                identity = self.identity
                if identity is None:  # the state machine only allows this after auth
                    self._close()
                elif event.command is Command.CONNECT:
                    self._connect(identity, event.host, event.port)
                else:  # UDP ASSOCIATE, or a reply to "not supported": the coroutine path
                    io = self._socket_io()
                    if io is not None:
                        self._detach()
                        self.owner.spawn(self._guarded(serve_request(runtime, io, server, identity, event)),
                                         self.sock)
                return

    def _on_timeout(self) -> None:
        self.timer = None
        if self.state is State.HTTP_HEAD:
            self._send(simple_response(408, "Request Timeout", b"request header timeout\n"))
        elif self.state is State.SOCKS:
            log.info("SOCKS5 client %s:%s did not finish its request in time", self.peer[0], self.peer[1])
        elif self.state is State.CONNECTING:
            assert self.address is not None
            self._connect_failed(connect_timed_out(self.address, self._record().port or 0,
                                                   self.runtime.options.connect_timeout))
            return
        self._close()

    # --- connecting upstream ----------------------------------------------------------

    def _connect(self, identity: Identity, host: str, port: int) -> None:
        runtime = self.runtime
        self.state = State.CONNECTING
        self._cancel_timer()
        # A planned connect (an allowed address literal, remembered) takes its slot and
        # connects; its record is made after the reply has gone (`_record`): off the
        # client's path. Anything else has its record from here on.
        plan = runtime.direct_plan(identity, host, port)
        if plan is not None:
            self.planned = (identity, port, plan)
            self.connect_started = time.monotonic()
            try:
                self.slot = runtime.admit_slot(identity, self.peer[0])
            except UpstreamError as exc:  # past a cap: 429
                self._connect_failed(exc)
                return
            self.address, decision = plan[0], plan[1]
        else:
            record = self.record = start_record(runtime, self.peer, identity)
            record.destination = host
            try:
                direct = runtime.direct_candidate(identity, host, port, record)
            except (FlowRefused, UpstreamError) as exc:
                self._connect_failed(exc)
                return
            if direct is None:  # a name, several candidates, or a path that awaits
                self._stop_reading()
                self.state = State.OPENING
                self.owner.handshakes.discard(self)  # the task counts instead
                self.owner.spawn(self._open_tcp(identity, host, port), self.sock)
                return
            self.address, decision = direct
            self.connect_started = time.monotonic()
        assert decision.source_address is not None
        try:
            upstream, connected = start_connect(decision.source_address, self.address, port,
                                                runtime.options.sockets, runtime.spares)
        except UpstreamError as exc:
            self._connect_failed(exc)
            return
        self.upstream = upstream
        if connected:
            self._connected(decision)
            return
        self._record()  # a wait: its timeout and its outcome go to the record
        self.writing = True
        self.poller.add_writer(upstream.fileno(), self._on_upstream_writable, decision)
        self.timer = runtime.deadlines.add(runtime.options.connect_timeout, self._on_timeout)
        runtime.spares.refill(decision.source_address, runtime.options.sockets)

    def _on_upstream_writable(self, decision: Decision) -> None:
        upstream = self.upstream
        if upstream is None or self.state is not State.CONNECTING:
            return
        # The writer stays registered until the relay's reader is (`_tunnel`): an fd with no
        # interest left is removed from the poller, and would be added again.
        self._cancel_timer()
        assert self.address is not None
        error = connect_outcome(upstream, self.address, self._record().port or 0)
        if error is not None:
            self._stop_writing(upstream)
            self._connect_failed(error)
            return
        try:
            self._connected(decision)
        except Exception:  # a bug must cost one connection, never the PoP
            log.exception("unexpected error serving %s:%s", self.peer[0], self.peer[1])
            self._close()

    def _connected(self, decision: Decision) -> None:
        upstream = self.upstream
        assert upstream is not None
        # The record's decision and destination are this candidate's (`direct_candidate`,
        # or the plan's). The local address is for SOCKS5's reply and the flow record: a
        # system call that an HTTP tunnel whose records nobody reads does without.
        local: tuple[Any, ...] = ("", 0)
        flowlog = self.runtime.flowlog
        if self.socks is not None or flowlog.enabled or flowlog.sinks:  # `flowlog.read`, inline
            local = upstream.getsockname()
            self.local_address = f"{local[0]}:{local[1]}"
            if self.record is not None:
                self.record.local_address = self.local_address
        elapsed = time.monotonic() - self.connect_started
        self._tunnel(upstream, local)  # the reply first: what follows is not on the client's path
        runtime = self.runtime
        runtime.observe_connect(decision, elapsed)
        assert decision.source_address is not None
        runtime.spares.refill(decision.source_address, runtime.options.sockets)  # the next one's

    def _connect_failed(self, exc: FlowRefused | UpstreamError) -> None:
        record = self._record()
        if self.socks is not None:
            if isinstance(exc, FlowRefused):
                record.outcome, record.error = "refused", exc.decision.reason
                code = ReplyCode.CONNECTION_NOT_ALLOWED
            else:
                record.outcome, record.error = "upstream-error", exc.reason
                code = ReplyCode(exc.socks_reply)
            self._send(self.socks.reply(code))
        else:
            self._send(failure_response(record, exc))
        self.runtime.finish(record)
        self._close()

    async def _open_tcp(self, identity: Identity, host: str, port: int) -> None:
        """The awaiting part (resolve, Happy Eyeballs, backbone), as the listener's task."""
        record = self.record
        assert record is not None
        try:
            upstream = await self.runtime.open_tcp(identity, host, port, record)
        except (FlowRefused, UpstreamError) as exc:
            self._connect_failed(exc)
            return
        except Exception:  # a bug costs this flow, answered and logged; never the PoP
            log.exception("unexpected error connecting %s:%s for %s:%s", host, port, *self.peer)
            self._connect_failed(UpstreamError("internal error"))
            return
        except BaseException:
            self._close()
            raise
        self.upstream = upstream
        try:
            self._tunnel(upstream, bound_address(upstream))
        except BaseException:
            self._close()
            raise

    async def _guarded(self, coro: Coroutine[Any, Any, bool]) -> None:
        await guarded(coro, self.sock.close, self.peer)

    def _record(self) -> FlowRecord:
        """The flow's record. A planned connect's is made on first use: after the reply has
        gone, or when the connect fails or has to wait first."""
        record = self.record
        if record is None:
            assert self.planned is not None
            identity, port, (_, decision, destination, hostname) = self.planned
            record = self.record = start_record(self.runtime, self.peer, identity)
            record.port, record.decision, record.destination, record.hostname = port, decision, destination, hostname
            record.admitted, record.local_address = self.slot, self.local_address
            # The flow began at the connect, not now.
            record.started -= record.started_monotonic - self.connect_started
            record.started_monotonic = self.connect_started
        return record

    # --- the tunnel -------------------------------------------------------------------

    def _tunnel(self, upstream: socket.socket, local: tuple[Any, ...]) -> None:
        runtime = self.runtime
        self.upstream = None  # the tunnel's from here on, whatever happens
        if self.socks is not None:
            reply = self.socks.reply(ReplyCode.SUCCEEDED, local[0], local[1])
            early = self.socks.remainder()
        else:
            reply = self.reply
            # No reader: the head was known (`_known_connect`) and was all that came.
            early = self.head_reader.remainder() if self.head_reader is not None else b""
        sent = 0
        try:
            if not early:
                try:  # noqa: SIM105 (suppress() is three calls: hot path)
                    sent = self.sock.send(reply)
                except BlockingIOError:
                    pass
            if sent < len(reply) or early:
                # Bytes to send that may have to wait: the coroutine path sends them.
                self._stop_writing(upstream)
                io = SocketIO(self.sock)
                self._detach()
                self.owner.spawn(self._guarded(start_tunnel(runtime, io, upstream, self._record(),
                                                            reply[sent:], early)),
                                 self.sock, upstream)
                return
        except OSError as exc:
            self._stop_writing(upstream)
            upstream.close()
            record = self._record()
            record.outcome, record.closed_by, record.error = "client-error", "client", str(exc)
            runtime.finish(record)
            self._close()
            return
        on_close = tunnel_started(runtime, self._record())  # a planned connect's, made now
        self.state = State.DONE
        self.owner.handshakes.discard(self)
        # The relay's reader on the client socket replaces the handshake's, if any, and its
        # reader on the upstream replaces the connect's writer in one `epoll_ctl`.
        relay = SpliceRelay(self.poller, runtime.pipes, self.sock, upstream, on_close, runtime.relays,
                            sole_owner=True)
        replacing, self.writing = self.writing, False
        try:
            relay.start(replacing_writer=self.poller if replacing else None)
        except BaseException:
            if replacing:  # a writer left behind would be called on every turn
                self.poller.remove_writer(upstream.fileno())
            raise

    # --- endings ----------------------------------------------------------------------

    def _send(self, data: bytes) -> bool:
        """Send a handshake reply at once. Replies are a few bytes on a socket that has
        sent nothing yet: one that does not fit ends the connection."""
        if not data:
            return True
        try:
            return self.sock.send(data) == len(data)
        except OSError:
            return False

    def _socket_io(self) -> SocketIO | None:
        """The connection for a coroutine handler; None (and closed) if the client is gone."""
        try:
            return SocketIO(self.sock)
        except OSError:
            self._close()
            return None

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.poller.remove_reader(self.sock.fileno())

    def _stop_writing(self, upstream: socket.socket) -> None:
        if self.writing:
            self.writing = False
            self.poller.remove_writer(upstream.fileno())

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer[1] = None  # Deadlines.cancel, inline
            self.timer = None

    def _detach(self) -> None:
        """The connection goes to a coroutine: the handshake lets go of it."""
        self._stop_reading()
        self._cancel_timer()
        self.state = State.DONE
        self.owner.handshakes.discard(self)

    def _close(self) -> None:
        if self.state is State.DONE:
            return
        if self.slot is not None and self.record is None:  # taken, and no record to release it
            self.runtime.release_slot(self.slot)
            self.slot = None
        self._detach()
        if self.upstream is not None:
            self._stop_writing(self.upstream)
            self.upstream.close()
            self.upstream = None
        self.sock.close()

    def abort(self) -> None:
        """The listener closes: end the handshake now (its flow is not logged)."""
        self._close()
