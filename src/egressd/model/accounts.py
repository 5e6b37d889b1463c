"""Accounts (tenants), their identities and their dedicated egress locations (R2)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from egressd.model.policy import EgressPolicy


class Plan(StrEnum):
    FREE = "free"
    ENTERPRISE = "enterprise"


class Fallback(StrEnum):
    """What a flow that matches no policy does when no dedicated location is usable (R11)."""

    CLOSED = "closed"
    SHARED = "shared"


class LocationState(StrEnum):
    """R2: an address is used only once confirmed; a released one sits in quarantine."""

    PENDING = "pending"  # assigned, waiting for the admin to confirm allowlists are updated
    ACTIVE = "active"
    QUARANTINED = "quarantined"  # released; kept out of use and out of reassignment


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """Settings › Network. `proxy_udp` requires `proxy_tcp` (R3)."""

    proxy_tcp: bool = True
    proxy_udp: bool = False
    fallback: Fallback = Fallback.CLOSED


@dataclass(frozen=True, slots=True)
class DedicatedLocation:
    """One IPv4 address and one IPv6 range of one account, tied to a home PoP."""

    id: str
    home_pop: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Network | None
    state: LocationState = LocationState.ACTIVE


@dataclass(frozen=True, slots=True)
class User:
    name: str
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Device:
    """A device credential. Only a SHA-256 of the secret is ever kept."""

    id: str
    user: str
    secret_sha256: str


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    plan: Plan
    settings: NetworkSettings = NetworkSettings()
    locations: tuple[DedicatedLocation, ...] = ()
    users: tuple[User, ...] = ()
    devices: tuple[Device, ...] = ()
    policies: tuple[EgressPolicy, ...] = field(default=())

    def active_locations(self) -> tuple[DedicatedLocation, ...]:
        return tuple(loc for loc in self.locations if loc.state is LocationState.ACTIVE)
