"""The lab's DNS server: the lab zone, and a witness of who asks.

Authoritative for one zone over UDP and TCP: A and AAAA from the zone file, and
`whoami.<zone>` TXT answered with the address the query came from (like
`o-o.myaddr.l.google.com`), so a test can see which source address a resolver used (R4).
Every query is appended to a JSON-lines log — source address and the interface it arrived
on (in the lab, the link of the PoP that sent it): the lab's proof of what the upstream saw.
Names outside the zone get REFUSED, unknown names in it NXDOMAIN; malformed packets are
dropped and counted in the log.

Run: ``python -m egressd.lab.dns_server ZONE_JSON LOG --listen ADDR [--listen ADDR] [--port 53]``
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import struct
import time
from pathlib import Path
from typing import IO

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from egressd.echo import arrival

TTL = 30
MAX_TCP_MESSAGE = 65535


class Zone:
    """Pure: a query in, an answer out."""

    def __init__(self, origin: str, records: dict[str, list[str]]) -> None:
        self.origin = dns.name.from_text(origin)
        self.records = {dns.name.from_text(name): [ipaddress.ip_address(a) for a in addresses]
                        for name, addresses in records.items()}
        self.whoami = dns.name.from_text("whoami", self.origin)

    def _lookup(self, name: dns.name.Name) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
        if name in self.records:
            return self.records[name]
        if len(name) > 1:  # a wildcard one level up (RFC 4592, simplified)
            return self.records.get(dns.name.Name((b"*", *name.parent().labels)))
        return None

    def answer(self, wire: bytes, source: str) -> tuple[bytes | None, dict[str, str]]:
        """The response to one query, and what to log about it."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError) as exc:
            return None, {"error": type(exc).__name__}
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire(), {"error": "question count"}
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        seen = {"name": name.to_text(), "type": dns.rdatatype.to_text(rdtype)}
        if not name.is_subdomain(self.origin):
            response.set_rcode(dns.rcode.REFUSED)
            response.flags &= ~dns.flags.AA
        elif name == self.whoami and rdtype in (dns.rdatatype.TXT, dns.rdatatype.ANY):
            response.answer.append(dns.rrset.from_text(name, 0, "IN", "TXT", f'"{source}"'))
        elif (found := self._lookup(name)) is not None:
            wanted = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(rdtype)
            addresses = [str(a) for a in found if a.version == wanted]
            if addresses:
                response.answer.append(dns.rrset.from_text_list(
                    name, TTL, "IN", dns.rdatatype.to_text(rdtype), addresses))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        seen["rcode"] = dns.rcode.to_text(response.rcode())
        return response.to_wire(), seen


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.handle(data, addr, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DnsServer:
    def __init__(self, zone: Zone, log: IO[str]) -> None:
        self.zone = zone
        self.log = log

    def handle(self, wire: bytes, peer: tuple[str, int], transport: str, link: str | None = None) -> bytes | None:
        reply, seen = self.zone.answer(wire, peer[0])
        entry = {"ts": round(time.time(), 3), "source": peer[0], "port": peer[1], "transport": transport, **seen}
        if link is not None:
            entry["link"] = link  # the interface the query arrived on: in the lab, the PoP's link
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()
        return reply

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                async with asyncio.timeout(10):
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    wire = await reader.readexactly(length)
                reply = self.handle(wire, (peer[0], peer[1]), "tcp", arrival.tcp_arrival(writer.get_extra_info("socket")))
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


async def run(zone: Zone, log_path: Path, hosts: list[str], port: int) -> None:
    loop = asyncio.get_running_loop()
    with log_path.open("a", encoding="utf-8") as log:
        server = DnsServer(zone, log)
        closers = []
        for host in hosts:
            _bound, close = arrival.serve_udp_with_link(
                loop, host, port, lambda wire, peer, link: server.handle(wire, peer, "udp", link))
            closers.append(close)
            tcp = await asyncio.start_server(server.tcp, host, port)
            for sock in tcp.sockets:
                arrival.enable(sock)
            closers.append(tcp.close)
        print("ready", flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        for close in closers:
            close()


def main() -> None:
    parser = argparse.ArgumentParser(description="The egressd lab's DNS server.")
    parser.add_argument("zone", type=Path, help="JSON: {\"origin\": ..., \"records\": {name: [addresses]}}")
    parser.add_argument("log", type=Path, help="JSON-lines query log")
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args()
    spec = json.loads(args.zone.read_text(encoding="utf-8"))
    asyncio.run(run(Zone(spec["origin"], spec["records"]), args.log, args.listen, args.port))


if __name__ == "__main__":
    main()
