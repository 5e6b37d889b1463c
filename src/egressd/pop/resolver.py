"""Hostname resolution for proxied flows: both families, cached, with static lab names.

Without upstreams the system resolver is used. With `upstreams` (`egressd pop
--dns-upstream`), names are asked of those servers with dnspython from a socket bound to
the PoP's shared address — the gateway's own DNS queries never leave from a dedicated
address (R4) — and cached for the records' TTL. This module is the single place the PoP
turns names into addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping, Sequence

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from egressd.model.addresses import IPAddress


class ResolveError(Exception):
    pass


class UpstreamFailure(Exception):
    """An upstream answered with an error (SERVFAIL, REFUSED): try the next one."""


class Resolver:
    def __init__(
        self,
        static: Mapping[str, Sequence[IPAddress]] | None = None,
        cache_ttl: float = 30.0,
        max_entries: int = 10_000,
        upstreams: Sequence[tuple[IPAddress, int]] = (),
        query_timeout: float = 2.0,
    ) -> None:
        self._static = {name.lower().rstrip("."): tuple(addresses) for name, addresses in (static or {}).items()}
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...]]] = {}
        self._ttl = cache_ttl
        self._max = max_entries
        self.upstreams = tuple(upstreams)
        self.query_timeout = query_timeout
        #: The source address for queries to an upstream of IP version v (the PoP's shared
        #: address); None lets the kernel choose.
        self.source_for: Callable[[int], IPAddress | None] = lambda version: None

    @staticmethod
    def literal(host: str) -> IPAddress | None:
        """`host` as an address if it is an address literal (no resolution needed)."""
        try:
            return ipaddress.ip_address(host)
        except ValueError:
            return None

    async def resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        """Every address of `host` (both families), or ResolveError with a readable reason."""
        address = self.literal(host)
        if address is not None:
            return (address,)
        name = host.lower().rstrip(".")
        static = self._static.get(name)
        if static is not None:
            return static
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.upstreams:
            ttl, found = await self._ask_upstreams(name)
            self._remember(name, now + min(ttl, self._ttl), found)
            return found
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ResolveError(f"cannot resolve {host!r}: {exc.strerror}") from exc
        addresses: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise ResolveError(f"{host!r} has no addresses")
        self._remember(name, now + self._ttl, tuple(addresses))
        return tuple(addresses)

    def _remember(self, name: str, until: float, addresses: tuple[IPAddress, ...]) -> None:
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[name] = (until, addresses)

    async def _ask_upstreams(self, name: str) -> tuple[float, tuple[IPAddress, ...]]:
        """A and AAAA from the first upstream that answers: (TTL, addresses)."""
        problems: list[str] = []
        for server, port in self.upstreams:
            try:
                answers = await asyncio.gather(*(self._query(name, kind, server, port)
                                                 for kind in (dns.rdatatype.AAAA, dns.rdatatype.A)))
            except (dns.exception.DNSException, OSError, UpstreamFailure) as exc:
                problems.append(f"{server}: {exc or type(exc).__name__}")
                continue
            ttl = min((t for t, found in answers if found), default=0.0)
            addresses = tuple(address for _, found in answers for address in found)
            if not addresses:
                rcodes = {t for t, _ in answers}
                raise ResolveError(f"cannot resolve {name!r}: " + (
                    "no such name" if -1.0 in rcodes else "no A or AAAA records"))
            return max(ttl, 1.0), addresses
        raise ResolveError(f"cannot resolve {name!r}: no upstream answered ({'; '.join(problems)})")

    async def _query(self, name: str, kind: dns.rdatatype.RdataType, server: IPAddress,
                     port: int) -> tuple[float, tuple[IPAddress, ...]]:
        """(TTL, addresses) of one record type; TTL -1 for NXDOMAIN. UDP, TCP when truncated."""
        query = dns.message.make_query(name, kind)
        source = self.source_for(server.version)
        response, _ = await dns.asyncquery.udp_with_fallback(
            query, str(server), timeout=self.query_timeout, port=port,
            source=str(source) if source is not None else None)
        if response.rcode() == dns.rcode.NXDOMAIN:
            return -1.0, ()
        if response.rcode() != dns.rcode.NOERROR:
            raise UpstreamFailure(f"answered {dns.rcode.to_text(response.rcode())}")
        found: list[IPAddress] = []
        ttl = float("inf")
        for rrset in response.answer:
            if rrset.rdtype == kind:
                ttl = min(ttl, float(rrset.ttl))
                found += [ipaddress.ip_address(rdata.address) for rdata in rrset]
        return (ttl if found else 0.0), tuple(found)
