"""The PoP's DNS resolver: port 53 (UDP and TCP) and DoH for devices, and the PoP's own
lookups, through one cache, asking upstream resolvers from the PoP's shared address (R4).

DNS resolved by the gateway never leaves from a dedicated address (DESIGN R4): every
upstream question is sent from a socket bound to the PoP's first shared address of the
upstream's family, whoever asked. It forwards to the configured upstreams (`egressd pop
--dns-upstream`, in order; without any, the host's /etc/resolv.conf servers) — it does not
recurse from the root itself. Identical questions in flight share one upstream question.
Messages are handled at the wire level (`protocols.dns_wire`): a cache hit is answered
synchronously, without a task, which is what makes this fast enough to front devices.

Each query is one flow in the flow log (protocol `dns`, rule R4). Port 53 cannot carry a
credential, so it answers only sources in `--dns-allow` (default: loopback), REFUSED
otherwise — an open resolver is an amplifier. DoH (`/dns-query` on the PoP's listeners)
takes a device credential instead (or an allowed source). Malformed or oversized queries
get FORMERR or NOTIMP, or are dropped (too short to answer, or a response); each is logged.
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

import dns.resolver

from egressd.decide import Decision, Egress
from egressd.model.addresses import IPAddress, IPNetwork
from egressd.pop.dns_cache import DnsCache
from egressd.pop.dns_upstream import UpstreamSockets, UpstreamTimeout
from egressd.pop.flowlog import FlowLog, FlowRecord
from egressd.protocols import dns_wire
from egressd.protocols.dns_wire import Question, Sections, read_question

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


@dataclass(frozen=True, slots=True)
class Resolved:
    """One resolution: the answer, its age in the cache, where it was asked and from where."""

    sections: Sections
    age: int = 0
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
        self.sockets = UpstreamSockets()
        self._in_flight: dict[tuple[bytes, int, int, int], asyncio.Future[Resolved]] = {}
        self._allowed_sources: dict[str, bool] = {}
        self._closers: list[Callable[[], None]] = []
        self._tcp_tasks: set[asyncio.Task[None]] = set()
        self.addresses: list[tuple[str, int]] = []
        self.counts = {"queries": 0, "refused": 0, "malformed": 0, "upstream_failures": 0}

    # -- resolution (shared by devices and the PoP's own lookups)

    async def resolve(self, question: Question) -> Resolved:
        """The answer to `question`: from the cache, or asked upstream once for everyone."""
        now = time.monotonic()
        entry = self.cache.get(question.key, now)
        if entry is not None:
            return Resolved(entry.sections, entry.age(now))
        flight_key = (*question.key, question.flags & dns_wire.CD)
        pending = self._in_flight.get(flight_key)
        if pending is None:
            pending = asyncio.ensure_future(self._ask_upstreams(question))
            self._in_flight[flight_key] = pending
            pending.add_done_callback(lambda _: self._in_flight.pop(flight_key, None))
        return await asyncio.shield(pending)

    async def _ask_upstreams(self, question: Question) -> Resolved:
        problems: list[str] = []
        for index, (server, port) in enumerate(self.upstreams):
            source = self.source_for(server.version)
            try:
                sections = await self.sockets.ask(question, server, port, source, self.timeout)
            except (UpstreamTimeout, OSError) as exc:
                problems.append(f"{server}: {exc or type(exc).__name__}")
                continue
            if sections.rcode in (dns_wire.SERVFAIL, dns_wire.REFUSED) and index < len(self.upstreams) - 1:
                problems.append(f"{server}: rcode {sections.rcode}")
                continue
            # Stored once, by the one question in flight, not by each asker waiting on it.
            self.cache.put(question.key, sections, time.monotonic())
            return Resolved(sections, 0, server, source)
        self.counts["upstream_failures"] += 1
        raise UpstreamFailed("; ".join(problems) or "no upstream resolver is configured")

    # -- a device's query

    def allowed(self, client: str) -> bool:
        known = self._allowed_sources.get(client)
        if known is None:
            if len(self._allowed_sources) > 10_000:
                self._allowed_sources.clear()
            known = self._allowed_sources[client] = self._allowed(client)
        return known

    def _allowed(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)

    def answer_from_cache(self, wire: bytes, client: tuple[str, int], transport: str) -> bytes | None:
        """The hot path, synchronous: a plain query from an allowed source whose answer is
        cached. None: take the full path (`answer`), which handles everything else."""
        question = read_question(wire)
        if question is None or not self.allowed(client[0]):
            return None
        now = time.monotonic()
        entry = self.cache.get(question.key, now)
        if entry is None:
            return None
        response = dns_wire.render(question, wire, entry.sections, entry.age(now), _limit(question, transport))
        self.counts["queries"] += 1
        if self.flowlog.enabled or self.flowlog.sinks:
            record = self._record(wire, client, question)
            record.decision, record.bytes_down = self._decision(None), len(response)
            self.flowlog.write(record)
        return response

    async def answer(self, wire: bytes, client: tuple[str, int], transport: str, *,
                     account: str | None = None, user: str | None = None, device: str | None = None,
                     authorized: bool = False) -> bytes | None:
        """The response to one query from a device (None: drop it), and its flow-log line."""
        self.counts["queries"] += 1
        question = read_question(wire) if len(wire) <= MAX_QUERY else None
        record = self._record(wire, client, question)
        record.account, record.user, record.device = account, user, device
        if question is None:
            response = self._unusual(wire, client, record)
        elif not (authorized or self.allowed(client[0])):
            self.counts["refused"] += 1
            record.outcome, record.error = "refused", f"{client[0]} may not use this resolver (--dns-allow)"
            response = dns_wire.error(question, wire, dns_wire.REFUSED)
        else:
            try:
                resolved = await self.resolve(question)
            except UpstreamFailed as exc:
                record.outcome, record.error = "upstream-error", str(exc)[:300]
                log.warning("dns: %s (type %d) for %s: %s", record.hostname, question.qtype, client[0], exc)
                response = dns_wire.error(question, wire, dns_wire.SERVFAIL)
            else:
                record.decision = self._decision(resolved.source)
                record.destination = str(resolved.upstream) if resolved.upstream is not None else None
                response = dns_wire.render(question, wire, resolved.sections, resolved.age,
                                           _limit(question, transport))
        if response is not None:
            record.bytes_down = len(response)
        self.flowlog.write(record)
        return response

    def _record(self, wire: bytes, client: tuple[str, int], question: Question | None) -> FlowRecord:
        return FlowRecord(flow_id=f"{self.code}-dns-{self.counts['queries']}", protocol="dns",
                          connected_pop=self.code, client=f"{client[0]}:{client[1]}", port=53,
                          hostname=question.text() if question is not None else None, bytes_up=len(wire))

    def _decision(self, source: IPAddress | None) -> Decision:
        return Decision(Egress.SHARED, "R4", self.code, source_address=source, egress_pop=self.code,
                        reason="DNS resolved by the gateway")

    def _unusual(self, wire: bytes, client: tuple[str, int], record: FlowRecord) -> bytes | None:
        """Not a plain query: FORMERR or NOTIMP with the query's ID, or nothing."""
        self.counts["malformed"] += 1
        record.outcome = "protocol-error"
        if len(wire) > MAX_QUERY:
            record.error = f"oversized query ({len(wire)} bytes > {MAX_QUERY})"
        elif len(wire) < 12:
            record.error = f"malformed query: {len(wire)} bytes, no header"
        else:
            flags = struct.unpack_from("!H", wire, 2)[0]
            record.error = ("a response, not a query" if flags & dns_wire.QR
                            else "not a standard query" if flags & 0x7800
                            else "malformed query: not one plain question")
        log.info("dns: %s from %s:%s", record.error, client[0], client[1])
        if len(wire) < 12:
            return None  # not even a header to answer to
        query_id, flags = struct.unpack_from("!HH", wire)
        if flags & dns_wire.QR:
            return None  # never answer a response (reflection loops)
        rcode = dns_wire.NOTIMP if flags & 0x7800 else dns_wire.FORMERR
        return dns_wire.HEADER.pack(query_id, dns_wire.QR | (flags & 0x7800) | rcode, 0, 0, 0, 0)

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
        self.sockets.close()
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
                        record = self._record(b"", client, None)
                        record.outcome = "protocol-error"
                        record.error = f"oversized query ({length} bytes > {MAX_QUERY})"
                        self.counts["malformed"] += 1
                        log.info("dns: %s from %s:%s", record.error, client[0], client[1])
                        self.flowlog.write(record)
                        return
                    wire = await reader.readexactly(length)
                response = self.answer_from_cache(wire, client, "tcp") or await self.answer(wire, client, "tcp")
                if response is None:
                    return
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def _limit(question: Question, transport: str) -> int:
    """The largest answer the asker takes: 512 over UDP without EDNS (RFC 1035 §4.2.1), its
    EDNS payload size with it, anything over TCP and DoH."""
    if transport != "udp":
        return 65535
    return max(UDP_ANSWER, question.edns_payload)


class _UdpDns(asyncio.DatagramProtocol):
    def __init__(self, service: DnsService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        fast = self.service.answer_from_cache(data, addr, "udp")
        if fast is not None:
            if self.transport is not None:
                self.transport.sendto(fast, addr)
            return
        task = asyncio.ensure_future(self._reply(data, (str(addr[0]), int(addr[1]))))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, client: tuple[str, int]) -> None:
        response = await self.service.answer(data, client, "udp")
        if response is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(response, client)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns udp: %s", exc)
