"""The RFC 8805 geofeed (R10): every shared and dedicated address and range of the
inventory, in the city of the PoP it belongs to — dedicated IPv6 ranges included, whole,
wherever their per-PoP sub-ranges are announced (R9)."""

from __future__ import annotations

import ipaddress

from sqlalchemy import select
from sqlalchemy.orm import Session

from egressd.control.tables import AddressRow, DataCenterRow
from egressd.protocols.geofeed import GeofeedEntry, format_geofeed

HEADER = "egressd geofeed (RFC 8805): shared and dedicated egress addresses by city"


def geofeed_entries(session: Session) -> list[GeofeedEntry]:
    rows = session.execute(
        select(AddressRow.address, DataCenterRow.country, DataCenterRow.region, DataCenterRow.city)
        .join(DataCenterRow, DataCenterRow.code == AddressRow.data_center)
    ).all()
    entries = [
        GeofeedEntry(prefix=ipaddress.ip_network(address), country=country, region=region,
                     city=city)
        for address, country, region, city in rows
    ]
    entries.sort(key=lambda entry: (entry.prefix.version, entry.prefix))
    return entries


def geofeed_text(session: Session) -> str:
    return format_geofeed(geofeed_entries(session), header=HEADER)
