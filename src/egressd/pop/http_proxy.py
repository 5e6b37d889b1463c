"""The HTTP/1.1 forward-proxy handler: CONNECT tunnels and absolute-form requests.

Parsing is `egressd.protocols.http1` (sans-I/O); this module only moves bytes between
the device, the decision and the upstream, and answers with a precise status when a
step fails: 400/414/431 malformed request, 407 missing or wrong credentials (R13),
403 refused by the decision (with the rule), 502/504 upstream failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from egressd.pop.client_io import ClientIO
from egressd.pop.flowlog import FlowRecord
from egressd.pop.identity import Identity, authenticate
from egressd.pop.relay import RelayResult
from egressd.pop.runtime import FlowRefused, PopRuntime
from egressd.pop.upstream import UpstreamError
from egressd.protocols.http1 import (
    RequestHead,
    RequestHeadReader,
    ResponseHeadReader,
    connect_established,
    error_response,
    forward_head,
    forward_response_head,
    proxy_auth_required,
    simple_response,
)
from egressd.protocols.http1_body import BodyTracker, HttpError

log = logging.getLogger("egressd.pop.http")


@dataclass(slots=True)
class _KeptUpstream:
    """An upstream connection kept between requests of one client connection. Keyed by
    account, user, destination and snapshot version: never shared across source addresses."""

    key: tuple[str, str, str, int, int]
    sock: socket.socket
    record_source: str | None


async def serve_http(runtime: PopRuntime, io: ClientIO, initial: bytes) -> bool:
    """Serve one client connection. Returns True if the socket was handed to a relay."""
    reader = RequestHeadReader()
    if initial:
        reader.feed(initial)
    kept: _KeptUpstream | None = None
    try:
        while True:
            try:
                async with asyncio.timeout(runtime.options.handshake_timeout):
                    head = await _read_head(io, reader)
            except TimeoutError:
                await _try_send(io, simple_response(408, "Request Timeout", b"request header timeout\n"))
                return False
            except HttpError as error:
                runtime.metrics.protocol_errors.labels(runtime.code, "http").inc()
                log.info("bad request from %s:%s: %s", io.peer[0], io.peer[1], error.reason)
                await _try_send(io, error_response(error))
                return False
            if head is None:
                return False
            if head.is_origin_form:
                if not await _local_endpoint(runtime, io, head) or not head.keep_alive:
                    return False
                reader.remainder()
                continue
            identity = authenticate(runtime.state.snapshot, head.proxy_credentials)
            if identity is None:
                _log_auth_failure(runtime, io, head)
                keep = head.keep_alive and not head.body.has_body
                await io.send(proxy_auth_required(close=not keep))
                if not keep:
                    return False
                reader.remainder()
                continue
            if head.is_connect:
                return await _connect(runtime, io, head, identity, reader.remainder())
            keep_going, kept = await _forward(runtime, io, head, identity, reader, kept)
            if not keep_going:
                return False
    finally:
        if kept is not None:
            kept.sock.close()


async def _read_head(io: ClientIO, reader: RequestHeadReader) -> RequestHead | None:
    received = False
    while True:
        head = reader.next_head()
        if head is not None:
            return head
        data = await io.recv()
        if not data:
            if received:
                raise HttpError(400, "connection closed in the middle of a request head")
            return None
        received = True
        reader.feed(data)


async def _try_send(io: ClientIO, data: bytes) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        await io.send(data)


def _log_auth_failure(runtime: PopRuntime, io: ClientIO, head: RequestHead) -> None:
    runtime.metrics.auth_failures.labels(runtime.code, "http").inc()
    record = runtime.new_record("tcp", io.peer)
    record.destination, record.port = head.host, head.port
    record.outcome = "auth-failed"
    record.error = "missing proxy credentials" if head.proxy_credentials is None else (
        f"wrong credentials for device {head.proxy_credentials[0]!r}")
    runtime.finish(record)


def _start_record(runtime: PopRuntime, io: ClientIO, identity: Identity) -> FlowRecord:
    record = runtime.new_record("tcp", io.peer)
    record.account, record.user, record.device = identity.account, identity.user, identity.device
    return record


def _failure_response(runtime: PopRuntime, record: FlowRecord, exc: Exception) -> bytes:
    if isinstance(exc, FlowRefused):
        record.outcome, record.error = "refused", exc.decision.reason
        body = f"egressd: flow refused ({exc.decision.rule}): {exc.decision.reason}\n"
        return simple_response(403, "Forbidden", body.encode(),
                               headers=[("X-Egressd-Rule", exc.decision.rule)])
    assert isinstance(exc, UpstreamError)
    record.outcome, record.error = "upstream-error", exc.reason
    reason = "Gateway Timeout" if exc.status == 504 else "Bad Gateway"
    return simple_response(exc.status, reason, f"egressd: {exc.reason}\n".encode())


async def _connect(runtime: PopRuntime, io: ClientIO, head: RequestHead, identity: Identity,
                   early_data: bytes) -> bool:
    record = _start_record(runtime, io, identity)
    record.destination = head.host
    try:
        upstream = await runtime.open_tcp(identity, head.host, head.port, record)
    except (FlowRefused, UpstreamError) as exc:
        await _try_send(io, _failure_response(runtime, record, exc))
        runtime.finish(record)
        return False
    try:
        await io.send(connect_established())
        if early_data:
            await asyncio.get_running_loop().sock_sendall(upstream, early_data)
            record.bytes_up += len(early_data)
    except (ConnectionError, OSError) as exc:
        upstream.close()
        record.outcome, record.closed_by, record.error = "client-error", "client", str(exc)
        runtime.finish(record)
        return False
    runtime.metrics.active.labels(runtime.code, "tcp").inc()

    def on_close(result: RelayResult) -> None:
        runtime.metrics.active.labels(runtime.code, "tcp").dec()
        record.bytes_up += result.bytes_up
        record.bytes_down += result.bytes_down
        record.closed_by, record.error = result.closed_by, result.error
        runtime.finish(record)

    await io.tunnel(upstream, on_close, runtime.relays, runtime.pipes, runtime.options.idle_timeout)
    return not io.is_tls


async def _forward(
    runtime: PopRuntime, io: ClientIO, head: RequestHead, identity: Identity,
    reader: RequestHeadReader, kept: _KeptUpstream | None,
) -> tuple[bool, _KeptUpstream | None]:
    """One absolute-form request and its response. Returns (keep client open, kept upstream)."""
    loop = asyncio.get_running_loop()
    record = _start_record(runtime, io, identity)
    record.destination = head.host
    key = (identity.account, identity.user, head.host, head.port, runtime.state.snapshot.version)
    if kept is not None and kept.key != key:
        kept.sock.close()
        kept = None
    if kept is None:
        try:
            sock = await runtime.open_tcp(identity, head.host, head.port, record)
        except (FlowRefused, UpstreamError) as exc:
            await _try_send(io, _failure_response(runtime, record, exc))
            runtime.finish(record)
            return False, None
        kept = _KeptUpstream(key, sock, record.local_address)
    else:
        record.port = head.port
        record.decision = None
        record.local_address = kept.record_source
        # Same account, user, destination and snapshot: the same decision as the first request.
        addresses = await runtime.resolve(head.host, head.port)
        record.decision = runtime.decide_for(identity, "tcp", addresses[0], head.port,
                                             None if str(addresses[0]) == head.host else head.host)
    upstream = kept.sock
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
            await io.send(forward_response_head(response, runtime.options.via, close=close_client))
            if not response.is_interim:
                break
        tracker = BodyTracker(response.body, error_status=502)
        await _copy_body(lambda: loop.sock_recv(upstream, 65536), io.send, tracker,
                         response_reader.remainder(), record, up=False)
    except HttpError as error:
        record.outcome, record.error = "protocol-error", error.reason
        if error.status == 502:
            await _try_send(io, simple_response(502, "Bad Gateway", f"egressd: {error.reason}\n".encode()))
        else:
            await _try_send(io, error_response(error))
        runtime.finish(record)
        upstream.close()
        return False, None
    except UpstreamError as exc:
        await _try_send(io, _failure_response(runtime, record, exc))
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


async def _local_endpoint(runtime: PopRuntime, io: ClientIO, head: RequestHead) -> bool:
    """Requests addressed to the PoP itself: health, metrics and PAC files."""
    path = head.path.split("?", 1)[0]
    if head.method not in ("GET", "HEAD"):
        await io.send(simple_response(405, "Method Not Allowed", b"", close=False))
        return True
    if path == "/health":
        snapshot = runtime.state.snapshot
        body = json.dumps({
            "pop": runtime.code, "status": "draining" if runtime.draining else "ok",
            "snapshot_version": snapshot.version, "active_tunnels": len(runtime.relays),
        }).encode() + b"\n"
        await io.send(simple_response(200, "OK", body, headers=[("Content-Type", "application/json")], close=False))
    elif path == "/metrics":
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
