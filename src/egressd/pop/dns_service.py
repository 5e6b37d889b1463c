"""The PoP's DNS resolver: port 53 (UDP and TCP) and DoH for devices, and the PoP's own
lookups, through one cache, asking upstream resolvers from the PoP's shared address (R4).

DNS resolved by the gateway never leaves from a dedicated address (DESIGN R4): every
upstream query is sent from a socket bound to the PoP's first shared address of the
upstream's family, whoever asked. It forwards to the configured upstreams (`egressd pop
--dns-upstream`, in order; without any, the host's /etc/resolv.conf servers) — it does not
recurse from the root itself. Identical questions in flight share one upstream query.

Each query is one flow in the flow log (protocol `dns`, rule R4). Port 53 cannot carry a
credential, so it answers only sources in `--dns-allow` (default: loopback), REFUSED
otherwise — an open resolver is an amplifier. DoH (`/dns-query` on the PoP's listeners)
takes a device credential instead (or an allowed source). Malformed or oversized queries
get FORMERR or are dropped (too short to answer), with a log line; nothing crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.resolver

from egressd.decide import Decision, Egress
from egressd.model.addresses import IPAddress, IPNetwork
from egressd.pop.dns_cache import DnsCache, key_of
from egressd.pop.flowlog import FlowLog, FlowRecord

log = logging.getLogger("egressd.pop.dns")

MAX_QUERY = 4096  # a question is small; larger "queries" are abuse
UDP_ANSWER = 512  # without EDNS (RFC 1035 §4.2.1)
TCP_IDLE = 10.0
DEFAULT_ALLOW = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class UpstreamFailed(Exception):
    """No upstream gave an answer."""


def system_upstreams() -> list[tuple[IPAddress, int]]:
    """The host's resolvers (/etc/resolv.conf), for a PoP without --dns-upstream."""
    try:
        servers = dns.resolver.Resolver().nameservers
    except (dns.resolver.NoResolverConfiguration, OSError):
        return []
    found: list[tuple[IPAddress, int]] = []
    for server in servers:
        with contextlib.suppress(ValueError):
            found.append((ipaddress.ip_address(str(server)), 53))
    return found


@dataclass(slots=True)
class Asked:
    """What one resolution did: where it went, from which source, and the answer."""

    response: dns.message.Message
    upstream: IPAddress | None = None  # None: from the cache
    source: IPAddress | None = None


class DnsService:
    def __init__(self, code: str, upstreams: Sequence[tuple[IPAddress, int]],
                 source_for: Callable[[int], IPAddress | None], flowlog: FlowLog, *,
                 allow: Sequence[IPNetwork] = DEFAULT_ALLOW, cache: DnsCache | None = None,
                 timeout: float = 2.0) -> None:
        self.code = code
        self.upstreams = list(upstreams)
        self.source_for = source_for
        self.flowlog = flowlog
        self.allow = list(allow)
        self.cache = cache or DnsCache()
        self.timeout = timeout
        self._in_flight: dict[tuple[object, ...], asyncio.Future[Asked]] = {}
        self._closers: list[Callable[[], None]] = []
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self.addresses: list[tuple[str, int]] = []
        self.counts = {"queries": 0, "refused": 0, "malformed": 0, "upstream_failures": 0}

    # -- resolution (shared by devices and the PoP's own lookups)

    async def resolve(self, query: dns.message.Message) -> Asked:
        """The answer to `query`'s question: from the cache, or asked upstream once."""
        question = query.question[0]
        key = key_of(question)
        now = time.monotonic()
        cached = self.cache.get(key, now)
        if cached is not None:
            return Asked(self.cache.response(cached, query, now))
        flight_key = (*key, bool(query.flags & dns.flags.CD))
        pending = self._in_flight.get(flight_key)
        if pending is None:
            pending = asyncio.ensure_future(self._ask_upstreams(query))
            self._in_flight[flight_key] = pending
            pending.add_done_callback(lambda _: self._in_flight.pop(flight_key, None))
        asked = await asyncio.shield(pending)
        self.cache.put(key, asked.response, time.monotonic())
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.set_rcode(asked.response.rcode())
        response.answer = list(asked.response.answer)
        response.authority = list(asked.response.authority)
        return Asked(response, asked.upstream, asked.source)

    async def _ask_upstreams(self, query: dns.message.Message) -> Asked:
        upstream_query = dns.message.make_query(query.question[0].name, query.question[0].rdtype,
                                                query.question[0].rdclass, use_edns=0, payload=1232)
        problems: list[str] = []
        for server, port in self.upstreams:
            source = self.source_for(server.version)
            try:
                response, _tcp = await dns.asyncquery.udp_with_fallback(
                    upstream_query, str(server), timeout=self.timeout, port=port,
                    source=str(source) if source is not None else None)
            except (dns.exception.DNSException, OSError) as exc:
                problems.append(f"{server}: {exc or type(exc).__name__}")
                continue
            if response.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED) and server != self.upstreams[-1][0]:
                problems.append(f"{server}: {dns.rcode.to_text(response.rcode())}")
                continue
            return Asked(response, server, source)
        self.counts["upstream_failures"] += 1
        detail = "; ".join(problems) or "no upstream resolver is configured"
        raise UpstreamFailed(detail)

    # -- a device's query

    def allowed(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)

    async def answer(self, wire: bytes, client: tuple[str, int], transport: str, *,
                     account: str | None = None, user: str | None = None, device: str | None = None,
                     authorized: bool = False, max_size: int = 65535) -> bytes | None:
        """The response to one query from a device (None: drop it), and its flow-log line."""
        self.counts["queries"] += 1
        record = FlowRecord(flow_id=f"{self.code}-dns-{self.counts['queries']}", protocol="dns",
                            connected_pop=self.code, client=f"{client[0]}:{client[1]}",
                            account=account, user=user, device=device, port=53, bytes_up=len(wire))
        response = await self._answer(wire, client, transport, record, authorized, max_size)
        if response is not None:
            record.bytes_down = len(response)
        self.flowlog.write(record)
        return response

    async def _answer(self, wire: bytes, client: tuple[str, int], transport: str, record: FlowRecord,
                      authorized: bool, max_size: int) -> bytes | None:
        if len(wire) > MAX_QUERY:
            return self._malformed(record, wire, f"oversized query ({len(wire)} bytes > {MAX_QUERY})", client)
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError) as exc:
            return self._malformed(record, wire, f"malformed query: {type(exc).__name__}", client)
        if query.flags & dns.flags.QR:
            record.outcome, record.error = "protocol-error", "a response, not a query"
            return None
        if len(query.question) != 1 or query.opcode() != dns.opcode.QUERY:
            record.outcome, record.error = "protocol-error", "not one standard query"
            rcode = dns.rcode.FORMERR if query.opcode() == dns.opcode.QUERY else dns.rcode.NOTIMP
            return self._error(query, rcode)
        question = query.question[0]
        record.hostname = question.name.to_text(omit_final_dot=True)
        if not (authorized or self.allowed(client[0])):
            self.counts["refused"] += 1
            record.outcome, record.error = "refused", f"{client[0]} may not use this resolver (--dns-allow)"
            return self._error(query, dns.rcode.REFUSED)
        try:
            asked = await self.resolve(query)
        except UpstreamFailed as exc:
            record.outcome, record.error = "upstream-error", str(exc)[:300]
            log.warning("dns: %s %s for %s: %s", record.hostname, dns.rdatatype.to_text(question.rdtype),
                        client[0], exc)
            return self._error(query, dns.rcode.SERVFAIL)
        record.decision = self._decision(asked.source)
        record.destination = str(asked.upstream) if asked.upstream is not None else None
        record.local_address = str(asked.source) if asked.source is not None else None
        if transport != "udp":
            return bytes(asked.response.to_wire())
        return _udp_wire(asked.response, max(UDP_ANSWER, query.payload if query.edns >= 0 else 0))

    def _decision(self, source: IPAddress | None) -> Decision:
        return Decision(Egress.SHARED, "R4", self.code, source_address=source, egress_pop=self.code,
                        reason="DNS resolved by the gateway")

    def _error(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return bytes(response.to_wire())

    def _malformed(self, record: FlowRecord, wire: bytes, reason: str, client: tuple[str, int]) -> bytes | None:
        self.counts["malformed"] += 1
        record.outcome, record.error = "protocol-error", reason
        log.info("dns: %s from %s:%s", reason, client[0], client[1])
        if len(wire) < 12:
            return None  # not even a header to answer to
        query_id, flags = struct.unpack("!HH", wire[:4])
        if flags & 0x8000:
            return None  # a response: never answer one (reflection loops)
        # ID, QR + the query's opcode, RCODE FORMERR, no sections (RFC 1035 §4.1.1)
        return struct.pack("!HHHHHH", query_id, 0x8000 | (flags & 0x7800) | dns.rcode.FORMERR, 0, 0, 0, 0)

    # -- listeners

    async def start(self, listen: Sequence[tuple[str, int]], *, reuse_port: bool = False) -> None:
        """UDP and TCP on each HOST:PORT (port 0: one free port for both)."""
        loop = asyncio.get_running_loop()
        try:
            for host, port in listen:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpDns(self), local_addr=(host, port), reuse_port=reuse_port or None)
                self._closers.append(transport.close)
                bound = transport.get_extra_info("sockname")
                server = await asyncio.start_server(self._tcp_client, host, bound[1],
                                                    reuse_port=reuse_port or None)
                self._closers.append(server.close)
                self.addresses.append((bound[0], bound[1]))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()
        for task in list(self._tcp_tasks):
            task.cancel()

    def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve_tcp(reader, writer))
        self._tcp_tasks.add(task)
        task.add_done_callback(self._tcp_tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = (str(peer[0]), int(peer[1]))
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    if length > MAX_QUERY:  # logged, then closed: its bytes are not read
                        record = FlowRecord(flow_id=f"{self.code}-dns-oversized", protocol="dns",
                                            connected_pop=self.code, client=f"{client[0]}:{client[1]}", port=53)
                        self._malformed(record, b"", f"oversized query ({length} bytes > {MAX_QUERY})", client)
                        self.flowlog.write(record)
                        return
                    wire = await reader.readexactly(length)
                response = await self.answer(wire, client, "tcp")
                if response is None:
                    return
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def _udp_wire(response: dns.message.Message, limit: int) -> bytes:
    """The response within `limit` bytes, or its header and question with TC set, so the
    client asks again over TCP (RFC 1035 §4.2.1, RFC 7766)."""
    try:
        return bytes(response.to_wire(max_size=limit))
    except dns.exception.TooBig:
        response.answer, response.authority, response.additional = [], [], []
        response.flags |= dns.flags.TC
        return bytes(response.to_wire())


class _UdpDns(asyncio.DatagramProtocol):
    def __init__(self, service: DnsService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._reply(data, (str(addr[0]), int(addr[1]))))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, client: tuple[str, int]) -> None:
        response = await self.service.answer(data, client, "udp")
        if response is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(response, client)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns udp: %s", exc)
