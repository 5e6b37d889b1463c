"""Hostname resolution for proxied flows: both families, cached, with static lab names.

The system resolver is used until the PoP's own DNS resolver lands (DESIGN issue on DNS);
this module is the single place the PoP turns names into addresses, so that swap is local.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Mapping, Sequence

from egressd.model.addresses import IPAddress


class ResolveError(Exception):
    pass


class Resolver:
    def __init__(
        self,
        static: Mapping[str, Sequence[IPAddress]] | None = None,
        cache_ttl: float = 30.0,
        max_entries: int = 10_000,
    ) -> None:
        self._static = {name.lower().rstrip("."): tuple(addresses) for name, addresses in (static or {}).items()}
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...]]] = {}
        self._ttl = cache_ttl
        self._max = max_entries

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
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[name] = (now + self._ttl, tuple(addresses))
        return tuple(addresses)
