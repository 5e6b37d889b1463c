"""Address helpers shared by the model and the decision."""

from __future__ import annotations

import functools
import ipaddress
import zlib
from typing import TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def stable_hash(*parts: str) -> int:
    """A hash that is the same in every process and release (unlike `hash()`), for stickiness."""
    return zlib.crc32("\x1f".join(parts).encode())


def address_in_prefix(prefix: IPNetwork, key: int) -> IPAddress:
    """A host address inside `prefix` chosen by `key`, never the network address itself."""
    hosts = prefix.num_addresses - 1
    if hosts <= 0:
        return prefix.network_address
    offset = 1 + key % min(hosts, 1 << 16)
    return prefix.network_address + offset


def parse_address(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=8192)
def address_text(address: IPAddress) -> str:
    """`str(address)`, remembered: `ipaddress` formats it anew each time (~1 us), and a
    PoP writes the same few source and destination addresses for every flow."""
    return str(address)


@functools.lru_cache(maxsize=8192)
def address_literal(text: str) -> IPAddress | None:
    """`text` as an address if it is an IP literal, else None; remembered (a parse costs
    ~1.5 us and flows go to the same literals again and again)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=True)
