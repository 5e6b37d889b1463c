"""The SOCKS5 handler (RFC 1928 with RFC 1929 username/password): CONNECT and UDP ASSOCIATE.

Parsing is `egressd.protocols.socks5` (sans-I/O). Credentials are required on every
connection; a refused flow gets reply 0x02 ("not allowed by ruleset"), an upstream
failure the matching reply code, malformed input the protocol's reply and a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from egressd.pop.client_io import ClientIO, start_tunnel
from egressd.pop.identity import Identity
from egressd.pop.runtime import FlowRefused, PopRuntime
from egressd.pop.udp_relay import UdpAssociation
from egressd.pop.upstream import UpstreamError, bound_address
from egressd.protocols.socks5 import (
    Command,
    CredentialsReceived,
    Event,
    ProtocolFailure,
    ReplyCode,
    RequestReceived,
    Socks5Server,
)

log = logging.getLogger("egressd.pop.socks5")


async def serve_socks5(runtime: PopRuntime, io: ClientIO, initial: bytes) -> bool:
    """Serve one SOCKS5 control connection. Returns True if the socket went to a relay."""
    server = Socks5Server()
    identity: Identity | None = None
    events: list[Event] = server.receive_data(initial)
    try:
        async with asyncio.timeout(runtime.options.handshake_timeout):
            while True:
                out = server.data_to_send()
                if out:
                    await io.send(out)
                while events:
                    event = events.pop(0)
                    if isinstance(event, ProtocolFailure):
                        runtime.metrics.protocol_errors.labels(runtime.code, "socks5").inc()
                        log.info("bad SOCKS5 input from %s:%s: %s", io.peer[0], io.peer[1], event.message)
                        out = server.data_to_send()
                        if out:
                            await io.send(out)
                        return False
                    if isinstance(event, CredentialsReceived):
                        identity = runtime.authenticate((event.username, event.password), io.peer)
                        if identity is None:
                            log_auth_failure(runtime, io.peer, event.username)
                            await io.send(server.reject_credentials())
                            return False
                        await io.send(server.accept_credentials())
                        events.extend(server.receive_data(b""))
                    elif isinstance(event, RequestReceived):
                        if identity is None:  # the state machine only allows this after auth
                            return False
                        request = event
                        break
                else:
                    data = await io.recv()
                    if not data:
                        return False
                    events = server.receive_data(data)
                    continue
                break
    except TimeoutError:
        log.info("SOCKS5 client %s:%s did not finish its request in time", io.peer[0], io.peer[1])
        return False
    return await serve_request(runtime, io, server, identity, request)


async def serve_request(runtime: PopRuntime, io: ClientIO, server: Socks5Server, identity: Identity,
                        request: RequestReceived) -> bool:
    """Serve the request of an authenticated connection. True if the socket went to a relay."""
    if request.command is Command.CONNECT:
        return await _connect(runtime, io, server, identity, request)
    if request.command is Command.UDP_ASSOCIATE:
        await _udp_associate(runtime, io, server, identity, request)
        return False
    await io.send(server.reply(ReplyCode.COMMAND_NOT_SUPPORTED))
    return False


def log_auth_failure(runtime: PopRuntime, peer: tuple[str, int], username: str) -> None:
    runtime.metrics.auth_failures.labels(runtime.code, "socks5").inc()
    record = runtime.new_record("tcp", peer)
    record.outcome = "auth-failed"
    record.error = f"wrong credentials for device {username!r}"
    runtime.finish(record)


async def _connect(runtime: PopRuntime, io: ClientIO, server: Socks5Server, identity: Identity,
                   request: RequestReceived) -> bool:
    record = runtime.new_record("tcp", io.peer)
    record.account, record.user, record.device = identity.account, identity.user, identity.device
    record.destination = request.host
    try:
        upstream = await runtime.open_tcp(identity, request.host, request.port, record)
    except FlowRefused as exc:
        record.outcome, record.error = "refused", exc.decision.reason
        with contextlib.suppress(ConnectionError, OSError):
            await io.send(server.reply(ReplyCode.CONNECTION_NOT_ALLOWED))
        runtime.finish(record)
        return False
    except UpstreamError as exc:
        record.outcome, record.error = "upstream-error", exc.reason
        with contextlib.suppress(ConnectionError, OSError):
            await io.send(server.reply(ReplyCode(exc.socks_reply)))
        runtime.finish(record)
        return False
    bound_host, bound_port = bound_address(upstream)
    reply = server.reply(ReplyCode.SUCCEEDED, bound_host, bound_port)
    return await start_tunnel(runtime, io, upstream, record, reply, server.remainder())


async def _udp_associate(runtime: PopRuntime, io: ClientIO, server: Socks5Server,
                         identity: Identity, request: RequestReceived) -> None:
    """The association lives as long as its TCP control connection (RFC 1928 §7). It holds
    one flow slot of the account and of the source address while it lives (issue 9 caps)."""
    slot = runtime.admit_association(identity, io.peer[0])
    if slot is None:
        await io.send(server.reply(ReplyCode.CONNECTION_NOT_ALLOWED))
        return
    try:
        await _associate(runtime, io, server, identity, request)
    finally:
        runtime.release_slot(slot)


async def _associate(runtime: PopRuntime, io: ClientIO, server: Socks5Server,
                     identity: Identity, request: RequestReceived) -> None:
    association = UdpAssociation(runtime, identity, client_host=io.peer[0],
                                 requested=(request.host, request.port))
    try:
        host, port = await association.start(io.local[0])
    except OSError as exc:
        log.warning("cannot open a UDP relay socket on %s: %s", io.local[0], exc)
        await io.send(server.reply(ReplyCode.GENERAL_FAILURE))
        return
    try:
        await io.send(server.reply(ReplyCode.SUCCEEDED, host, port))
        runtime.metrics.active.labels(runtime.code, "udp").inc()
        closed = asyncio.ensure_future(association.closed.wait())
        try:
            while True:
                recv = asyncio.ensure_future(io.recv())
                done, _ = await asyncio.wait({recv, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    recv.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await recv
                    break
                if not recv.result():
                    break  # the client closed the control connection
        finally:
            closed.cancel()
            runtime.metrics.active.labels(runtime.code, "udp").dec()
    finally:
        await association.close("client" if not association.closed.is_set() else association.closed_by)
