"""Egress policies: an ordered list per account, first match wins, they only choose the egress.

A selector matches when every field it sets matches (AND across fields, OR within one
field's list); an empty field matches anything. `destinations` holds CIDRs and hostname
patterns (`example.com`, `*.example.com`) together: a proxy sees the hostname.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

from egressd.model.addresses import IPNetwork

SHARED_SECONDARY: Final = "shared"
PROTOCOLS: Final = frozenset({"tcp", "udp", "dns"})


@dataclass(frozen=True, slots=True)
class Selector:
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    hostnames: tuple[str, ...] = ()  # lower-case; "*.example.com" matches subdomains only
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    protocols: frozenset[str] = frozenset()
    connected_pops: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SharedAction:
    """Leave from the connected PoP's shared address."""


@dataclass(frozen=True, slots=True)
class DedicatedAction:
    """Primary IPv4 location, a required secondary (a location or `shared`), an IPv6 location."""

    primary: str
    secondary: str
    ipv6: str


PolicyAction: TypeAlias = SharedAction | DedicatedAction


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    id: str
    selector: Selector
    action: PolicyAction
    name: str = ""
