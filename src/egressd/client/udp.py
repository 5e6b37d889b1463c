"""The local SOCKS5 UDP ASSOCIATE of the device client, carried as CONNECT-UDP (RFC 9298).

Each destination (host, port) an application sends to becomes one ``connect-udp`` stream
of the device link, opened on its first datagram; payloads ride as DATAGRAM capsules
(context id 0) and replies come back wrapped in the SOCKS5 UDP header. Datagrams are
accepted only from the address of the client that asked for the association (and from
the first port it used); fragments are dropped (RFC 1928 §7 allows it); a destination
whose stream cannot be opened, or that is behind, loses datagrams, as UDP may.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from egressd.client.attach import Attachment, NoPopReachable
from egressd.mux import DatagramStream, MuxError
from egressd.protocols.socks5 import ProtocolError, build_udp_datagram, parse_udp_datagram

__all__ = ["UdpRelay"]

log = logging.getLogger("egressd.client.udp")

MAX_TARGETS: Final = 256  # destinations per association
QUEUE: Final = 256  # datagrams per destination waiting for its stream


class _Target:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        self.task: asyncio.Task[None] | None = None


class UdpRelay(asyncio.DatagramProtocol):
    def __init__(self, attachment: Attachment, client_host: str) -> None:
        self.attachment = attachment
        self.client_host = client_host
        self.client_addr: tuple[Any, ...] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.targets: dict[tuple[str, int], _Target] = {}
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if addr[0] != self.client_host or (self.client_addr is not None
                                           and addr[:2] != self.client_addr[:2]):
            self.dropped += 1
            return
        self.client_addr = addr
        try:
            datagram = parse_udp_datagram(data)
        except ProtocolError:
            self.dropped += 1
            return
        if datagram.is_fragment:
            self.dropped += 1
            return
        key = (datagram.host, datagram.port)
        target = self.targets.get(key)
        if target is None:
            if len(self.targets) >= MAX_TARGETS:
                self.dropped += 1
                return
            target = self.targets[key] = _Target()
            target.task = asyncio.ensure_future(self._carry(key, target))
        try:
            target.queue.put_nowait(datagram.payload)
        except asyncio.QueueFull:
            self.dropped += 1

    def error_received(self, exc: Exception) -> None:
        log.debug("local UDP: %s", exc)

    async def _carry(self, key: tuple[str, int], target: _Target) -> None:
        host, port = key
        try:
            flow = await self.attachment.open_udp(host, port)
        except (MuxError, NoPopReachable) as error:
            log.info("UDP to %s:%d refused: %s", host, port, error)
            return
        datagrams = DatagramStream(flow.stream)
        receiving = asyncio.ensure_future(self._replies(datagrams, host, port))
        try:
            while True:
                await datagrams.send(await target.queue.get())
        except MuxError as error:
            log.info("UDP to %s:%d ended: %s", host, port, error)
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
            flow.stream.release()

    async def _replies(self, datagrams: DatagramStream, host: str, port: int) -> None:
        with contextlib.suppress(EOFError, MuxError):
            while True:
                payload = await datagrams.recv()
                if self.transport is not None and self.client_addr is not None:
                    self.transport.sendto(build_udp_datagram(host, port, payload), self.client_addr)

    async def close(self) -> None:
        tasks = [target.task for target in self.targets.values() if target.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.targets.clear()
        if self.transport is not None:
            self.transport.close()
