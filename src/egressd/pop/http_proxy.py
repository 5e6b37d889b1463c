"""The HTTP/1.1 forward-proxy handler: CONNECT tunnels and absolute-form requests.

Parsing is `egressd.protocols.http1` (sans-I/O); this module only moves bytes between
the device, the decision and the upstream, and answers with a precise status when a
step fails: 400/414/431 malformed request, 407 missing or wrong credentials (R13),
403 refused by the decision (with the rule), 502/504 upstream failures.

On a plain connection, the first absolute-form request hands the socket to
`http_forward.ForwardProxyProtocol`, which forwards that request and the ones after it
with transport callbacks (the hot path). A CONNECT or a request for the PoP itself that
comes later on that connection is handed back here, on a duplicate of the socket, and
served by the same code as a first request (a CONNECT is spliced). The TLS listener keeps
the coroutine path for everything (`_forward`): its connections are few and long-lived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from egressd.pop.client_io import ClientIO, SocketIO, start_tunnel
from egressd.pop.doh import MAX_BODY as DOH_MAX_BODY
from egressd.pop.doh import PATH as DOH_PATH
from egressd.pop.doh import serve_doh
from egressd.pop.flowlog import FlowRecord
from egressd.pop.http_answers import (
    bad_request,
    failure_response,
    log_auth_failure,
    protocol_error_response,
    start_record,
)
from egressd.pop.http_exchange import Detached
from egressd.pop.http_forward import ForwardProxyProtocol
from egressd.pop.identity import Identity
from egressd.pop.runtime import FlowRefused, PopRuntime
from egressd.pop.upstream import UpstreamError
from egressd.protocols.http1 import (
    RequestHead,
    RequestHeadReader,
    ResponseHeadReader,
    connect_established,
    forward_head,
    forward_response_head,
    proxy_auth_required,
    simple_response,
)
from egressd.protocols.http1_body import BodyKind, BodyTracker, HttpError

log = logging.getLogger("egressd.pop.http")


@dataclass(slots=True)
class _KeptUpstream:
    """An upstream connection kept between requests of one client connection. Keyed by
    account, user, destination and snapshot version: never shared across source addresses."""

    key: tuple[str, str, str, int, int]
    sock: socket.socket
    record_source: str | None


async def serve_http(
    runtime: PopRuntime, io: ClientIO, initial: bytes,
    forward_connections: set[ForwardProxyProtocol] | None = None,
    *, reader: RequestHeadReader | None = None, head: RequestHead | None = None,
) -> bool:
    """Serve one client connection. Returns True if the socket was handed to a relay or
    to the forwarding transport (which closes it). `forward_connections` is the
    listener's set of live forwarding connections (for drain). A connection whose first
    `head` was read elsewhere (the plain listener's handshake) passes it with its `reader`."""
    if reader is None:
        reader = runtime.options.head_reader()
    if initial:
        reader.feed(initial)
    served = await _serve(runtime, io, reader, head, forward_connections)
    while isinstance(served, Detached):
        # A CONNECT or a local request after forwarded ones: the forwarding transport
        # gave the connection back on a duplicate socket, which is ours to close.
        try:
            resumed = SocketIO(served.sock)
        except OSError:  # the client is already gone
            served.sock.close()
            return False
        keep = False
        try:
            served = await _serve(runtime, resumed, served.reader, served.head, forward_connections)
            keep = served is not False
        finally:
            if not keep:
                resumed.close()
    return served


async def _serve(
    runtime: PopRuntime, io: ClientIO, reader: RequestHeadReader, pending: RequestHead | None,
    forward_connections: set[ForwardProxyProtocol] | None,
) -> bool | Detached:
    """The request loop; `pending` is a head already read. True: the socket went to a
    relay or to the forwarding transport; a Detached: that transport gave it back."""
    kept: _KeptUpstream | None = None
    try:
        while True:
            head: RequestHead | None = pending
            if pending is not None:
                pending = None
            else:
                try:
                    async with asyncio.timeout(runtime.options.handshake_timeout):
                        head = await _read_head(io, reader)
                except TimeoutError:
                    await _try_send(io, simple_response(408, "Request Timeout", b"request header timeout\n"))
                    return False
                except HttpError as error:
                    await _try_send(io, bad_request(runtime, io.peer, error))
                    return False
            if head is None:
                return False
            if head.is_origin_form and head.path.split("?", 1)[0] == DOH_PATH:
                body = await _local_body(runtime, io, reader, head)
                if body is None:
                    return False
                await serve_doh(runtime, io, head, body)
                if not head.keep_alive:
                    return False
                continue
            if head.is_origin_form:
                # A body after a local request is not read: close rather than parse it as a head.
                if (not await _local_endpoint(runtime, io, head) or not head.keep_alive
                        or head.body.has_body):
                    return False
                continue  # pipelined requests stay in the reader
            if not head.is_connect and isinstance(io, SocketIO):
                # The hot path: this request and the next ones go through the transport.
                detached = await serve_forward(runtime, io.sock, io.peer, reader, head,
                                               forward_connections)
                return True if detached is None else detached
            identity = runtime.authenticate(head.proxy_credentials, io.peer)
            if identity is None:
                log_auth_failure(runtime, io.peer, head)
                keep = head.keep_alive and not head.body.has_body
                await io.send(proxy_auth_required(close=not keep))
                if not keep:
                    return False
                continue  # pipelined requests stay in the reader
            if head.is_connect:
                return await _connect(runtime, io, head, identity, reader.remainder())
            keep_going, kept = await _forward(runtime, io, head, identity, reader, kept)
            if not keep_going:
                return False
    finally:
        if kept is not None:
            kept.sock.close()


async def serve_forward(
    runtime: PopRuntime,
    sock: socket.socket,
    peer: tuple[str, int],
    reader: RequestHeadReader,
    head: RequestHead,
    connections: set[ForwardProxyProtocol] | None = None,
) -> Detached | None:
    """Serve a plain client connection from an absolute-form `head` on, until it closes
    (None) or is handed back for a CONNECT or a local request (`Detached`). `sock` belongs
    to the transport from this call on, whatever happens. `connections` (the listener's)
    holds the connection while it lives, so that a drain can close it when idle."""
    loop = asyncio.get_running_loop()
    protocol = ForwardProxyProtocol(runtime, sock, peer, reader, head)
    try:
        await loop.connect_accepted_socket(lambda: protocol, sock=sock)
    except BaseException as exc:
        if protocol.transport is not None:
            protocol.abort()
        else:
            sock.close()
        if isinstance(exc, OSError):  # the client is already gone
            return None
        raise
    if connections is not None:
        connections.add(protocol)
    try:
        return await protocol.wait_closed()
    except asyncio.CancelledError:
        protocol.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await protocol.wait_closed()
        if protocol.detached is not None:
            protocol.detached.sock.close()
        raise
    finally:
        if connections is not None:
            connections.discard(protocol)


async def _read_head(io: ClientIO, reader: RequestHeadReader) -> RequestHead | None:
    received = False
    while True:
        head = reader.next_head()
        if head is not None:
            return head
        data = await io.recv()
        if not data:
            if received or reader.buffered:
                raise HttpError(400, "connection closed in the middle of a request head")
            return None
        received = True
        reader.feed(data)


async def _try_send(io: ClientIO, data: bytes) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        await io.send(data)


async def _connect(runtime: PopRuntime, io: ClientIO, head: RequestHead, identity: Identity,
                   early_data: bytes) -> bool:
    record = start_record(runtime, io.peer, identity)
    record.destination = head.host
    try:
        upstream = await runtime.open_tcp(identity, head.host, head.port, record)
    except (FlowRefused, UpstreamError) as exc:
        await _try_send(io, failure_response(record, exc))
        runtime.finish(record)
        return False
    return await start_tunnel(runtime, io, upstream, record, connect_established(), early_data)


async def _forward(
    runtime: PopRuntime, io: ClientIO, head: RequestHead, identity: Identity,
    reader: RequestHeadReader, kept: _KeptUpstream | None,
) -> tuple[bool, _KeptUpstream | None]:
    """One absolute-form request and its response. Returns (keep client open, kept upstream)."""
    loop = asyncio.get_running_loop()
    record = start_record(runtime, io.peer, identity)
    record.destination = head.host
    key = (identity.account, identity.user, head.host, head.port, runtime.state.snapshot.version)
    if kept is not None and kept.key != key:
        kept.sock.close()
        kept = None
    if kept is None:
        try:
            sock = await runtime.open_tcp(identity, head.host, head.port, record)
        except (FlowRefused, UpstreamError) as exc:
            await _try_send(io, failure_response(record, exc))
            runtime.finish(record)
            return False, None
        kept = _KeptUpstream(key, sock, record.local_address)
    else:
        record.port = head.port
        record.decision = None
        record.local_address = kept.record_source
        # Same account, user, destination and snapshot: the same decision as the first request
        # (a tunnel route's name is the connector's to resolve, R4).
        record.decision = runtime.private_name_decision(identity, head.host, head.port)
        if record.decision is None:
            addresses = await runtime.resolve(head.host, head.port)
            record.decision = runtime.decide_for(identity, "tcp", addresses[0], head.port,
                                                 None if str(addresses[0]) == head.host else head.host)
    upstream = kept.sock
    head_sent = False
    try:
        await loop.sock_sendall(upstream, forward_head(head, runtime.options.via))
        leftover = await _copy_body(io.recv, lambda data: loop.sock_sendall(upstream, data),
                                    BodyTracker(head.body), reader.remainder(), record, up=True)
        if leftover:
            reader.feed(leftover)
        response_reader = ResponseHeadReader(head.method)
        while True:
            response = response_reader.next_head()
            if response is None:
                data = await loop.sock_recv(upstream, 65536)
                if not data:
                    raise UpstreamError("upstream closed the connection before responding")
                response_reader.feed(data)
                continue
            close_client = not head.keep_alive or not response.keep_alive
            response_head = forward_response_head(response, runtime.options.via, close=close_client)
            if not response.is_interim:
                break
            await io.send(response_head)
        # Check the body bytes that came with the head before sending the head: a broken
        # body is then still a clean 502, not a 200 followed by garbage.
        tracker = BodyTracker(response.body, error_status=502)
        first = response_reader.remainder()
        taken = tracker.feed(first)
        head_sent = True
        await io.send(response_head + first[:taken])
        record.bytes_down += taken
        if not tracker.done:
            await _copy_body(lambda: loop.sock_recv(upstream, 65536), io.send, tracker,
                             b"", record, up=False)
    except HttpError as error:
        response_bytes = protocol_error_response(record, error)
        if not head_sent:  # mid-body, closing is the only honest signal left
            await _try_send(io, response_bytes)
        runtime.finish(record)
        upstream.close()
        return False, None
    except UpstreamError as exc:
        response_bytes = failure_response(record, exc)
        if not head_sent:
            await _try_send(io, response_bytes)
        runtime.finish(record)
        upstream.close()
        return False, None
    except (ConnectionError, OSError) as exc:
        record.outcome, record.error = "connection-error", str(exc)
        runtime.finish(record)
        upstream.close()
        return False, None
    record.closed_by = "client" if not head.keep_alive else None
    runtime.finish(record)
    if not response.keep_alive:
        upstream.close()
        kept = None
    return not close_client, kept


async def _copy_body(
    recv: Callable[[], Awaitable[bytes]],
    send: Callable[[bytes], Awaitable[None]],
    tracker: BodyTracker,
    first: bytes,
    record: FlowRecord,
    *,
    up: bool,
) -> bytes:
    """Forward one message body verbatim; returns the bytes read past its end."""
    data = first
    while True:
        if data:
            taken = tracker.feed(data)
            if taken:
                await send(data[:taken] if taken < len(data) else data)
                if up:
                    record.bytes_up += taken
                else:
                    record.bytes_down += taken
            if tracker.done:
                return data[taken:]
        elif tracker.done:
            return b""
        data = await recv()
        if not data:
            tracker.eof()
            return b""


async def _local_body(runtime: PopRuntime, io: ClientIO, reader: RequestHeadReader,
                      head: RequestHead) -> bytes | None:
    """The body of a request to the PoP itself (DoH POST), at most DOH_MAX_BODY bytes with a
    Content-Length; b"" without a body. None: refused with a response, close the connection."""
    if not head.body.has_body:
        return b""
    if head.body.kind is not BodyKind.CONTENT_LENGTH or head.body.length > DOH_MAX_BODY:
        await _try_send(io, simple_response(413, "Content Too Large",
                                            f"a body of at most {DOH_MAX_BODY} bytes, with Content-Length\n".encode()))
        return None
    data = reader.remainder()
    try:
        async with asyncio.timeout(runtime.options.handshake_timeout):
            while len(data) < head.body.length:
                chunk = await io.recv()
                if not chunk:
                    return None
                data += chunk
    except TimeoutError:
        await _try_send(io, simple_response(408, "Request Timeout", b"request body timeout\n"))
        return None
    if len(data) > head.body.length:
        reader.feed(data[head.body.length:])  # pipelined requests
    return data[:head.body.length]


async def _local_endpoint(runtime: PopRuntime, io: ClientIO, head: RequestHead) -> bool:
    """Requests addressed to the PoP itself: health, metrics and PAC files."""
    path = head.path.split("?", 1)[0]
    if head.method not in ("GET", "HEAD"):
        await io.send(simple_response(405, "Method Not Allowed", b"", close=False))
        return True
    if path == "/health":
        snapshot = runtime.state.snapshot
        health: dict[str, object] = {
            "pop": runtime.code, "status": "draining" if runtime.draining else "ok",
            "snapshot_version": snapshot.version, "active_tunnels": len(runtime.relays),
            "config": runtime.state.config.health(),
        }
        tunnels = getattr(runtime.tunnels, "status", None)
        if tunnels is not None:
            health["tunnels"] = tunnels()
        peers = getattr(runtime.backbone, "peers", None)
        if peers:  # the backbone's view of every peer: reachable, RTT (R6, R11)
            view = runtime.state.view
            health["backbone"] = {code: {"up": code in view.up,
                                         "rtt_ms": view.rtt_ms.get((runtime.code, code))}
                                  for code in sorted(peers)}
        body = json.dumps(health).encode() + b"\n"
        await io.send(simple_response(200, "OK", body, headers=[("Content-Type", "application/json")], close=False))
    elif path == "/metrics":
        runtime.flow_metrics.flush()  # this process's batched figures, before they are read
        await io.send(simple_response(200, "OK", runtime.metrics.exposition(),
                                      headers=[("Content-Type", "text/plain; version=0.0.4")], close=False))
    elif path.startswith("/pac/") and path.endswith(".pac"):
        account = path[len("/pac/"):-len(".pac")]
        if account not in runtime.state.snapshot.accounts:
            await io.send(simple_response(404, "Not Found", b"no such account\n", close=False))
        else:
            await io.send(simple_response(200, "OK", pac_file(io.local, tls=io.is_tls).encode(),
                                          headers=[("Content-Type", "application/x-ns-proxy-autoconfig")],
                                          close=False))
    else:
        await io.send(simple_response(404, "Not Found", b"this is an egressd PoP: use it as a proxy\n", close=False))
    return True


def pac_file(listener: tuple[str, int], *, tls: bool) -> str:
    """A PAC file that sends everything but local names through this PoP, with no DIRECT
    fallback: an organisation that pays for dedicated egress wants it to fail closed."""
    host, port = listener
    host = f"[{host}]" if ":" in host else host
    kind = "HTTPS" if tls else "PROXY"
    return (
        "function FindProxyForURL(url, host) {\n"
        '  if (isPlainHostName(host) || host === "localhost" || shExpMatch(host, "127.*")) {\n'
        '    return "DIRECT";\n'
        "  }\n"
        f'  return "{kind} {host}:{port}";\n'
        "}\n"
    )
