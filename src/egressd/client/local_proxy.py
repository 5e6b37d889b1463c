"""The device's local proxy: SOCKS5 and HTTP on one loopback port (first byte 0x05 is
SOCKS5), and the PAC file, every flow carried to the PoP as a stream of one device link.

Parsing is the sans-I/O codecs the PoP uses (`protocols.socks5`, `protocols.http1`); the
relay is `mux.pump`, so a local flow is: accept, read one request, open a stream, pump.
Only loopback clients are expected, so SOCKS5 asks for no credentials: the device
credential is added by the link, never seen by applications.

An absolute-form HTTP request is forwarded with `Connection: close` (its connection is
then a tunnel to that origin): the client opens a new connection for the next request.
SOCKS5 UDP ASSOCIATE is carried as CONNECT-UDP streams (`client.udp`). SOCKS5 BIND is
not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from egressd.client.attach import Attachment, FlowOpened, NoPopReachable
from egressd.client.udp import UdpRelay
from egressd.mux import MuxError, StreamRefused, pump
from egressd.protocols.http1 import (
    HttpError,
    RequestHead,
    RequestHeadReader,
    error_response,
    forward_head,
    simple_response,
)
from egressd.protocols.socks5 import (
    Command,
    CredentialsReceived,
    ProtocolFailure,
    ReplyCode,
    RequestReceived,
    Socks5Server,
)

__all__ = ["LocalProxy", "pac_file"]

log = logging.getLogger("egressd.client.proxy")

RECV: Final = 65536
HANDSHAKE_TIMEOUT: Final = 10.0
VIA: Final = "egressd-client"


def pac_file(host: str, port: int) -> str:
    """Everything through the local proxy; loopback and plain names direct. No DIRECT
    fallback for the rest: a flow never leaves around the gateway (fail closed)."""
    return (
        "function FindProxyForURL(url, host) {\n"
        '  if (isPlainHostName(host) || host === "localhost")\n'
        '    return "DIRECT";\n'
        f'  return "PROXY {host}:{port}; SOCKS5 {host}:{port}";\n'
        "}\n"
    )


def _socks_reply(status: int) -> ReplyCode:
    if status in (403, 407, 429):
        return ReplyCode.CONNECTION_NOT_ALLOWED
    if status == 504:
        return ReplyCode.TTL_EXPIRED
    if status == 502:
        return ReplyCode.HOST_UNREACHABLE
    return ReplyCode.GENERAL_FAILURE


class LocalProxy:
    def __init__(self, attachment: Attachment, host: str = "127.0.0.1", port: int = 40000,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.attachment = attachment
        self.host = host
        self.port = port
        self.status_page = status
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"{self.host}:{self.port}: {error.strerror}") from error
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept(sock), name="client-proxy-accept")

    @property
    def pac_url(self) -> str:
        return f"http://{self.host}:{self.port}/proxy.pac"

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _peer = await loop.sock_accept(sock)
            except OSError as error:  # EMFILE and friends: keep the listener
                log.warning("accept failed: %s", error)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                first = await asyncio.get_running_loop().sock_recv(conn, RECV)
            if first[:1] == b"\x05":
                await self._socks(conn, first)
            elif first:
                await self._http(conn, first)
        except (TimeoutError, OSError):
            pass
        except Exception:  # a bug costs one connection, never the client
            log.exception("local proxy connection failed")
        finally:
            conn.close()

    async def _open(self, host: str, port: int) -> FlowOpened | tuple[int, str]:
        """A stream to host:port, or (status, reason) when the gateway refused it."""
        try:
            return await self.attachment.open_tcp(host, port)
        except StreamRefused as refused:
            return refused.status, refused.reason
        except (MuxError, NoPopReachable) as error:
            return 502, f"no PoP reachable: {error}"

    async def _relay(self, flow: FlowOpened, conn: socket.socket, early: bytes) -> None:
        try:
            if early:
                await flow.stream.write(early)
            await pump(flow.stream, conn)
        except MuxError as error:
            log.info("flow through %s ended: %s", flow.connected_pop, error)
        finally:
            flow.stream.release()

    # --- SOCKS5 --------------------------------------------------------------------

    async def _socks(self, conn: socket.socket, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        server = Socks5Server(allow_no_auth=True)
        events = server.receive_data(first)
        request: RequestReceived | None = None
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            while request is None:
                out = server.data_to_send()
                if out:
                    await loop.sock_sendall(conn, out)
                while events:
                    event = events.pop(0)
                    if isinstance(event, CredentialsReceived):
                        # An application that insists on a login gets in with any: the
                        # device credential is the link's, not the application's.
                        await loop.sock_sendall(conn, server.accept_credentials())
                        events.extend(server.receive_data(b""))
                        continue
                    if isinstance(event, ProtocolFailure):
                        out = server.data_to_send()
                        if out:
                            await loop.sock_sendall(conn, out)
                        return
                    if isinstance(event, RequestReceived):
                        request = event
                if request is None:
                    data = await loop.sock_recv(conn, RECV)
                    if not data:
                        return
                    events = server.receive_data(data)
        if request.command is Command.UDP_ASSOCIATE:
            await self._udp_associate(conn, server)
            return
        if request.command is not Command.CONNECT:
            await loop.sock_sendall(conn, server.reply(ReplyCode.COMMAND_NOT_SUPPORTED))
            return
        opened = await self._open(request.host, request.port)
        if isinstance(opened, tuple):
            log.info("SOCKS5 %s:%d refused: %s %s", request.host, request.port, *opened)
            await loop.sock_sendall(conn, server.reply(_socks_reply(opened[0])))
            return
        await loop.sock_sendall(conn, server.reply(ReplyCode.SUCCEEDED))
        await self._relay(opened, conn, server.remainder())

    async def _udp_associate(self, conn: socket.socket, server: Socks5Server) -> None:
        """UDP ASSOCIATE: a local UDP port whose datagrams go out as CONNECT-UDP streams,
        for as long as the control connection stays open (RFC 1928 §7)."""
        loop = asyncio.get_running_loop()
        relay = UdpRelay(self.attachment, conn.getpeername()[0])
        transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=(self.host, 0))
        try:
            host, port = transport.get_extra_info("sockname")[:2]
            await loop.sock_sendall(conn, server.reply(ReplyCode.SUCCEEDED, host, port))
            while await loop.sock_recv(conn, RECV):
                pass  # anything more on the control connection is ignored
        finally:
            await relay.close()

    # --- HTTP ----------------------------------------------------------------------

    async def _http(self, conn: socket.socket, first: bytes) -> None:
        loop = asyncio.get_running_loop()
        reader = RequestHeadReader()
        reader.feed(first)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                while (head := reader.next_head()) is None:
                    data = await loop.sock_recv(conn, RECV)
                    if not data:
                        return
                    reader.feed(data)
        except HttpError as error:
            await loop.sock_sendall(conn, error_response(error))
            return
        if head.is_origin_form:
            await loop.sock_sendall(conn, self._local_page(head))
            return
        opened = await self._open(head.host, head.port)
        if isinstance(opened, tuple):
            status, reason = opened
            body = f"{status} egressd: {reason}\n".encode()
            # 407 is about the device credential, not the application's: 502 for it.
            shown = status if 400 <= status < 600 and status != 407 else 502
            await loop.sock_sendall(conn, simple_response(
                shown, "Refused by the gateway", body,
                (("Content-Type", "text/plain; charset=utf-8"),)))
            return
        if head.is_connect:
            await loop.sock_sendall(conn, (
                "HTTP/1.1 200 Connection Established\r\n"
                f"Egressd-Connected-Pop: {opened.connected_pop}\r\n"
                f"Egressd-Egress-Pop: {opened.egress_pop}\r\n\r\n").encode("latin-1"))
            await self._relay(opened, conn, reader.remainder())
            return
        early = forward_head(head, VIA, connection_close=True) + reader.remainder()
        await self._relay(opened, conn, early)

    def _local_page(self, head: RequestHead) -> bytes:
        """Requests to the proxy itself: the PAC file and the client's status."""
        if head.method == "GET" and head.path == "/proxy.pac":
            return simple_response(200, "OK", pac_file(self.host, self.port).encode(),
                                   (("Content-Type", "application/x-ns-proxy-autoconfig"),))
        if head.method == "GET" and head.path == "/status" and self.status_page is not None:
            body = json.dumps(self.status_page(), indent=2).encode() + b"\n"
            return simple_response(200, "OK", body, (("Content-Type", "application/json"),))
        return simple_response(404, "Not Found", b"the local proxy serves /proxy.pac and /status\n",
                               (("Content-Type", "text/plain; charset=utf-8"),))
