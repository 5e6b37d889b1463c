"""Hostname resolution for proxied flows: both families, cached, with static lab names.

With the PoP's DNS service (`egressd pop --dns-upstream`), names are resolved through it:
the same cache as the devices' queries, asked upstream from the PoP's shared address —
the gateway's own DNS queries never leave from a dedicated address (R4). Without it, the
system resolver. This module is the single place the PoP turns names into addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Mapping, Sequence

import dns.message
import dns.rcode
import dns.rdatatype

from egressd.model.addresses import IPAddress, address_literal
from egressd.pop.dns_service import DnsService, UpstreamFailed
from egressd.protocols.dns_wire import read_question, render


class ResolveError(Exception):
    pass


class Resolver:
    def __init__(
        self,
        static: Mapping[str, Sequence[IPAddress]] | None = None,
        cache_ttl: float = 30.0,
        max_entries: int = 10_000,
        service: DnsService | None = None,
    ) -> None:
        self._static = {name.lower().rstrip("."): tuple(addresses) for name, addresses in (static or {}).items()}
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...]]] = {}
        self._ttl = cache_ttl
        self._max = max_entries
        #: The PoP's DNS service: when set, names are resolved through it (its cache and
        #: upstreams, from the shared address); else by the system resolver.
        self.service = service

    @staticmethod
    def literal(host: str) -> IPAddress | None:
        """`host` as an address if it is an address literal (no resolution needed)."""
        return address_literal(host)

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
        if self.service is not None:
            ttl, found = await self._ask_service(self.service, name)
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

    async def _ask_service(self, service: DnsService, name: str) -> tuple[float, tuple[IPAddress, ...]]:
        """A and AAAA through the PoP's DNS service (its cache, its upstreams, its shared
        source address): (TTL, addresses)."""
        questions = []
        for kind in (dns.rdatatype.AAAA, dns.rdatatype.A):
            wire = dns.message.make_query(name, kind).to_wire()
            question = read_question(wire)
            if question is None:
                raise ResolveError(f"cannot resolve {name!r}: not a valid name")
            questions.append((wire, question))
        try:
            answers = await asyncio.gather(*(service.resolve(question) for _, question in questions))
        except UpstreamFailed as exc:
            raise ResolveError(f"cannot resolve {name!r}: {exc}") from None
        found: list[IPAddress] = []
        ttl = float("inf")
        nxdomain = False
        for (wire, question), resolved in zip(questions, answers, strict=True):
            response = dns.message.from_wire(render(question, wire, resolved.sections, resolved.age, 65535))
            nxdomain = nxdomain or response.rcode() == dns.rcode.NXDOMAIN
            for rrset in response.answer:
                if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    ttl = min(ttl, float(rrset.ttl))
                    found += [ipaddress.ip_address(rdata.address) for rdata in rrset]
        if not found:
            raise ResolveError(f"cannot resolve {name!r}: " + ("no such name" if nxdomain else "no A or AAAA records"))
        return max(ttl, 1.0), tuple(found)
