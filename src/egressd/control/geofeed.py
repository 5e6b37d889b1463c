"""The RFC 8805 geofeed (R10): every shared and dedicated address and range of the
inventory, in the city of the PoP it belongs to — dedicated IPv6 ranges included, whole,
wherever their per-PoP sub-ranges are announced (R9)."""

from __future__ import annotations

import ipaddress

from sqlalchemy import select
from sqlalchemy.orm import Session

from egressd.control.tables import AddressRow, DataCenterRow
from egressd.model.addresses import IPNetwork
from egressd.model.snapshot import Snapshot
from egressd.model.topology import DataCenter
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


def snapshot_entries(snapshot: Snapshot) -> list[GeofeedEntry]:
    """The same feed from a deployment (file) alone: every PoP's shared addresses and
    prefix, and every account's dedicated addresses and ranges, in their PoP's city."""
    places: list[tuple[IPNetwork, DataCenter]] = []
    for dc in snapshot.data_centers.values():
        places += [(ipaddress.ip_network(address), dc) for address in dc.shared_ipv4]
        if dc.shared_ipv6 is not None:
            places.append((dc.shared_ipv6, dc))
    for entry in snapshot.accounts.values():
        for location in entry.account.locations:
            home = snapshot.data_centers.get(location.home_pop)
            if home is None:
                continue
            places.append((ipaddress.ip_network(location.ipv4), home))
            if location.ipv6 is not None:
                places.append((location.ipv6, home))
    entries = {prefix: GeofeedEntry(prefix=prefix, country=dc.country, region=dc.region,
                                    city=dc.city) for prefix, dc in places}
    return sorted(entries.values(), key=lambda item: (item.prefix.version, item.prefix))


def snapshot_geofeed(snapshot: Snapshot) -> str:
    return format_geofeed(snapshot_entries(snapshot), header=HEADER)
