"""Upstream questions over a few long-lived UDP sockets, instead of one socket per query.

A socket per query costs a bind, a connect and a close each time. This keeps, per (source
address, upstream), a small set of connected UDP sockets bound to the PoP's shared address
(R4) on kernel-chosen random ports; an answer must carry the random 16-bit ID of a
question in flight on that socket *and* echo that question (RFC 5452), else it is
dropped; each socket is replaced after a number of queries, so source ports keep
changing. A truncated answer is asked again over TCP from the same source address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
from dataclasses import dataclass, field

from egressd.model.addresses import IPAddress
from egressd.protocols.dns_wire import Question, Sections, build_query, read_answer

log = logging.getLogger("egressd.pop.dns")

SOCKETS_PER_UPSTREAM = 8
QUERIES_PER_SOCKET = 2_000  # then a fresh socket (and port)


class UpstreamTimeout(Exception):
    pass


@dataclass(eq=False)
class _Channel:
    sock: socket.socket
    pending: dict[int, tuple[Question, asyncio.Future[Sections]]] = field(default_factory=dict)
    used: int = 0
    retiring: bool = False


class UpstreamSockets:
    def __init__(self, per_upstream: int = SOCKETS_PER_UPSTREAM) -> None:
        self.per_upstream = per_upstream
        self._channels: dict[tuple[str | None, str, int], list[_Channel]] = {}
        self._next = 0

    async def ask(self, question: Question, server: IPAddress, port: int, source: IPAddress | None,
                  timeout: float) -> Sections:  # noqa: ASYNC109 - a budget per question
        """The answer of server:port to `question`, asked from `source`. Raises
        UpstreamTimeout or OSError."""
        source_text = str(source) if source is not None else None
        channel = self._channel(source_text, str(server), port)
        query_id = secrets.randbelow(0x10000)
        while query_id in channel.pending:
            query_id = secrets.randbelow(0x10000)
        future: asyncio.Future[Sections] = asyncio.get_running_loop().create_future()
        channel.pending[query_id] = (question, future)
        channel.used += 1
        try:
            channel.sock.send(build_query(question, query_id))
            async with asyncio.timeout(timeout):
                sections = await future
        except TimeoutError:
            raise UpstreamTimeout(f"no answer within {timeout:g} s") from None
        finally:
            channel.pending.pop(query_id, None)
            if channel.retiring and not channel.pending:
                self._close(channel)
        if sections.truncated:
            return await self._ask_tcp(question, str(server), port, source_text, timeout)
        return sections

    async def _ask_tcp(self, question: Question, server: str, port: int, source: str | None,
                       timeout: float) -> Sections:  # noqa: ASYNC109
        query_id = secrets.randbelow(0x10000)
        wire = build_query(question, query_id)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    server, port, local_addr=(source, 0) if source is not None else None)
                try:
                    writer.write(struct.pack("!H", len(wire)) + wire)
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(length)
                finally:
                    writer.close()
        except TimeoutError:
            raise UpstreamTimeout(f"no answer over TCP within {timeout:g} s") from None
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("the upstream closed the TCP connection") from exc
        sections = read_answer(data, question)
        if sections is None or int.from_bytes(data[:2], "big") != query_id:
            raise ConnectionError("the upstream's TCP answer does not match the question")
        return sections

    def _channel(self, source: str | None, server: str, port: int) -> _Channel:
        channels = self._channels.setdefault((source, server, port), [])
        if len(channels) < self.per_upstream:
            channels.append(self._open(source, server, port))
            return channels[-1]
        self._next = (self._next + 1) % len(channels)
        channel = channels[self._next]
        if channel.used >= QUERIES_PER_SOCKET:
            channel.retiring = True
            if not channel.pending:
                self._close(channel)
            channel = channels[self._next] = self._open(source, server, port)
        return channel

    def _open(self, source: str | None, server: str, port: int) -> _Channel:
        sock = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if source is not None:
                sock.bind((source, 0))  # the shared address (R4); the kernel picks a random port
            sock.connect((server, port))  # only this upstream's datagrams reach the socket
        except OSError:
            sock.close()
            raise
        channel = _Channel(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, channel)
        return channel

    def _readable(self, channel: _Channel) -> None:
        for _ in range(64):
            try:
                data = channel.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier datagram
                log.debug("dns upstream: %s", exc)
                return
            waiting = channel.pending.get(int.from_bytes(data[:2], "big")) if len(data) >= 12 else None
            if waiting is None:
                continue
            question, future = waiting
            sections = read_answer(data, question)
            if sections is not None and not future.done():  # RFC 5452: the question echoed
                future.set_result(sections)

    def _close(self, channel: _Channel) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(channel.sock.fileno())
        channel.sock.close()
        for _question, future in channel.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("upstream socket closed"))

    def close(self) -> None:
        for channels in self._channels.values():
            for channel in channels:
                self._close(channel)
        self._channels.clear()
