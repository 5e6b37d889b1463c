"""Destination lookup tables: CIDRs by prefix length, hostnames by exact name and suffix.

They exist so that a decision never scans every route or rule: a CIDR lookup costs one
dict probe per distinct prefix length in the table, a hostname lookup one probe per label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from egressd.model.addresses import IPAddress, IPNetwork

V = TypeVar("V")


def normalise_hostname(name: str) -> str:
    return name.strip().rstrip(".").lower()


COARSE_V4 = 8
COARSE_V6 = 16


class CidrTable(Generic[V]):
    """Maps networks to values; finds the longest match or combines every match."""

    __slots__ = ("_by_family", "_coarse")

    def __init__(self) -> None:
        # family -> list of (prefix length, {network int: value}), longest first
        self._by_family: dict[int, list[tuple[int, dict[int, V]]]] = {4: [], 6: []}
        # family -> the /8 (IPv4) or /16 (IPv6) blocks any entry touches: most addresses
        # are rejected with one set probe instead of one dict probe per prefix length.
        self._coarse: dict[int, set[int]] = {4: set(), 6: set()}

    def add(self, network: IPNetwork, value: V, combine: Callable[[V, V], V] | None = None) -> None:
        bits, coarse = (32, COARSE_V4) if network.version == 4 else (128, COARSE_V6)
        first = int(network.network_address) >> (bits - coarse)
        span = 1 << max(0, coarse - network.prefixlen)
        self._coarse[network.version].update(range(first, first + span))
        levels = self._by_family[network.version]
        table = next((level for length, level in levels if length == network.prefixlen), None)
        if table is None:
            table = {}
            levels.append((network.prefixlen, table))
            levels.sort(key=lambda level: -level[0])
        key = int(network.network_address)
        if key in table and combine is not None:
            table[key] = combine(table[key], value)
        else:
            table.setdefault(key, value)

    def levels(self) -> dict[int, list[tuple[int, dict[int, V]]]]:
        """Per family, (prefix length, {network int: value}) longest first, for inlined walks."""
        return self._by_family

    def longest(self, address: IPAddress) -> V | None:
        return self.longest_int(address.version, int(address))

    def longest_int(self, version: int, as_int: int) -> V | None:
        """Longest match for an address given as (version, int): the hot path converts once."""
        if version == 4:
            if as_int >> (32 - COARSE_V4) not in self._coarse[4]:
                return None
            bits = 32
        else:
            if as_int >> (128 - COARSE_V6) not in self._coarse[6]:
                return None
            bits = 128
        for length, table in self._by_family[version]:
            shift = bits - length
            found = table.get(as_int >> shift << shift)
            if found is not None:
                return found
        return None

    def every(self, address: IPAddress) -> Iterable[V]:
        return self.every_int(address.version, int(address))

    def every_int(self, version: int, as_int: int) -> Iterable[V]:
        bits = 32 if version == 4 else 128
        for length, table in self._by_family[version]:
            shift = bits - length
            found = table.get(as_int >> shift << shift)
            if found is not None:
                yield found

    def __bool__(self) -> bool:
        return bool(self._by_family[4] or self._by_family[6])


class HostTable(Generic[V]):
    """Exact hostnames and `*.suffix` patterns; the most specific pattern wins."""

    __slots__ = ("exact", "wildcard")

    def __init__(self) -> None:
        self.exact: dict[str, V] = {}
        self.wildcard: dict[str, V] = {}  # "example.com" for "*.example.com"

    def add(self, pattern: str, value: V, combine: Callable[[V, V], V] | None = None) -> None:
        pattern = normalise_hostname(pattern)
        table, key = (
            (self.wildcard, pattern[2:]) if pattern.startswith("*.") else (self.exact, pattern)
        )
        if key in table and combine is not None:
            table[key] = combine(table[key], value)
        else:
            table.setdefault(key, value)

    def longest(self, hostname: str) -> V | None:
        found = self.exact.get(hostname)
        if found is not None or not self.wildcard:
            return found
        dot = hostname.find(".")
        while dot != -1:
            suffix = hostname[dot + 1 :]
            found = self.wildcard.get(suffix)
            if found is not None:
                return found
            dot = hostname.find(".", dot + 1)
        return None

    def every(self, hostname: str) -> Iterable[V]:
        found = self.exact.get(hostname)
        if found is not None:
            yield found
        if not self.wildcard:
            return
        dot = hostname.find(".")
        while dot != -1:
            found = self.wildcard.get(hostname[dot + 1 :])
            if found is not None:
                yield found
            dot = hostname.find(".", dot + 1)

    def __bool__(self) -> bool:
        return bool(self.exact or self.wildcard)
