"""The resolver's upstream sockets against real UDP and TCP servers on loopback: an answer
that does not echo the question is ignored even with the right ID (RFC 5452), a truncated
answer is asked again over TCP from the same source address, a silent upstream times out
and the next one is asked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.rrset
import pytest
from tests.e2e.helpers import udp_and_tcp_on_one_port

from egressd.pop.dns_service import DnsService
from egressd.pop.dns_upstream import UpstreamSockets, UpstreamTimeout
from egressd.pop.flowlog import FlowLog
from egressd.protocols.dns_wire import read_question

NAME = "big.lab.egressd.test."
SOURCE = ipaddress.ip_address("127.0.0.23")


def full_answer(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text_list(NAME, 60, "IN", "A", [f"192.0.2.{i}" for i in range(1, 41)]))
    return response


class TrickyUpstream(asyncio.DatagramProtocol):
    """Over UDP: first a forged answer (right ID, another question), then a truncated one."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.udp_sources: list[str] = []
        self.tcp_sources: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.udp_sources.append(addr[0])
        query = dns.message.from_wire(data)
        forged = dns.message.make_response(dns.message.make_query("other.lab.egressd.test.", "A"))
        forged.id = query.id
        forged.answer.append(dns.rrset.from_text("other.lab.egressd.test.", 60, "IN", "A", "198.51.100.66"))
        self.transport.sendto(forged.to_wire(), addr)
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.TC
        self.transport.sendto(truncated.to_wire(), addr)

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tcp_sources.append(writer.get_extra_info("peername")[0])
        length = struct.unpack("!H", await reader.readexactly(2))[0]
        wire = full_answer(dns.message.from_wire(await reader.readexactly(length))).to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        writer.close()


@pytest.fixture
async def tricky() -> AsyncIterator[tuple[TrickyUpstream, int]]:
    upstream = TrickyUpstream()
    transport, server, port = await udp_and_tcp_on_one_port(lambda: upstream, upstream.tcp)
    try:
        yield upstream, port
    finally:
        transport.close()
        server.close()


async def test_forged_answers_are_ignored_and_truncation_goes_to_tcp(tricky: tuple[TrickyUpstream, int]) -> None:
    upstream, port = tricky
    question = read_question(dns.message.make_query(NAME, "A").to_wire())
    assert question is not None
    sockets = UpstreamSockets()
    try:
        sections = await sockets.ask(question, ipaddress.ip_address("127.0.0.1"), port, SOURCE, 3.0)
    finally:
        sockets.close()
    assert sections.ancount == 40 and not sections.truncated
    assert b"\xc6\x33\x64\x42" not in sections.body  # 198.51.100.66, the forged answer's address
    assert upstream.udp_sources == ["127.0.0.23"] and upstream.tcp_sources == ["127.0.0.23"]  # R4 on both


async def test_a_silent_upstream_times_out_and_the_next_one_answers(tricky: tuple[TrickyUpstream, int]) -> None:
    _upstream, port = tricky
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:  # bound, never answers
        hole.bind(("127.0.0.1", 0))
        silent = (ipaddress.ip_address("127.0.0.1"), hole.getsockname()[1])
        question = read_question(dns.message.make_query(NAME, "A").to_wire())
        assert question is not None
        sockets = UpstreamSockets()
        with pytest.raises(UpstreamTimeout):
            await sockets.ask(question, *silent, None, 0.2)
        sockets.close()
        service = DnsService("tst", [silent, (ipaddress.ip_address("127.0.0.1"), port)],
                             lambda version: SOURCE, FlowLog.disabled(), timeout=0.3)
        try:
            resolved = await service.resolve(question)
        finally:
            service.close()
    assert resolved.sections.ancount == 40 and resolved.upstream == ipaddress.ip_address("127.0.0.1")
