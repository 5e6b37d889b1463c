"""Address helpers shared by the model and the decision."""

from __future__ import annotations

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


def parse_network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=True)
