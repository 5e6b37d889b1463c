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


#: id(address) -> (address, text). Keyed by identity, not value: `ipaddress` hashes in
#: Python (two calls), and the addresses a PoP formats again and again are the same
#: objects (the snapshot's source addresses, the literals `address_literal` remembers).
#: Each entry holds its address, so an identity cannot be reused while it is a key.
_TEXTS: dict[int, tuple[IPAddress, str]] = {}
_TEXTS_KEPT = 8192


def address_text(address: IPAddress) -> str:
    """`str(address)`, remembered: `ipaddress` formats it anew each time (~1 us), and a
    PoP writes the same few source and destination addresses for every flow."""
    entry = _TEXTS.get(id(address))
    if entry is not None and entry[0] is address:
        return entry[1]
    text = str(address)
    if len(_TEXTS) >= _TEXTS_KEPT:
        _TEXTS.clear()
    _TEXTS[id(address)] = (address, text)
    return text


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
