"""Private routes (tunnel connectors, WAN) and in-network origins."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from egressd.model.addresses import IPNetwork


class RouteKind(StrEnum):
    TUNNEL = "tunnel"
    WAN = "wan"


@dataclass(frozen=True, slots=True)
class PrivateRoute:
    """Destinations of one account reached through a connector or a WAN link (R4)."""

    id: str
    account: str
    kind: RouteKind
    networks: tuple[IPNetwork, ...]
    hostnames: tuple[str, ...]
    via: str  # connector id (tunnel) or WAN link name


@dataclass(frozen=True, slots=True)
class InNetworkOrigin:
    """An origin served inside the gateway's network that trusts PROXY v2 from the PoPs (R8)."""

    name: str
    networks: tuple[IPNetwork, ...]
    hostnames: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Connector:
    """A tunnel connector of one account: it dials out to PoPs and proves itself with a
    token whose SHA-256 is all the configuration keeps (the token is shown once)."""

    id: str
    account: str
    token_sha256: str
