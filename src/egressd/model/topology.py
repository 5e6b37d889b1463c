"""Data centers (PoPs): where devices attach and where packets leave."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from egressd.model.addresses import IPAddress

EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True, slots=True)
class DataCenter:
    """One PoP. `slot` numbers it so each location's IPv6 range has a sub-range per PoP (R9)."""

    code: str
    city: str
    country: str
    region: str
    latitude: float
    longitude: float
    shared_ipv4: tuple[ipaddress.IPv4Address, ...]
    shared_ipv6: ipaddress.IPv6Network | None
    backbone_address: IPAddress | None
    slot: int


def great_circle_km(a: DataCenter, b: DataCenter) -> float:
    """Haversine distance; the lab and `serve` derive simulated backbone delay from it."""
    lat1, lon1 = math.radians(a.latitude), math.radians(a.longitude)
    lat2, lon2 = math.radians(b.latitude), math.radians(b.longitude)
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
