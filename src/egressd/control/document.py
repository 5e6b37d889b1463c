"""The store <-> the deployment document (the TOML deployment file's schema, as JSON).

The document is what PoPs receive: they validate and index it with the same code that
reads a deployment file (`egressd.model.deployment.load_document`). Building it reads
each table once with plain selects and groups in Python, so 10,000 accounts and 100,000
addresses take a fraction of a second rather than one query per account.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from egressd.control.tables import (
    AccountRow,
    AddressRow,
    ConfigVersion,
    DataCenterRow,
    DeploymentSettingsRow,
    DeviceRow,
    GroupRow,
    LocationRow,
    MembershipRow,
    OriginRow,
    PolicyRow,
    PrivateRouteRow,
    QuarantineRow,
    TunnelRow,
    UserRow,
)

Document = dict[str, Any]


def aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def current_version(session: Session) -> int:
    return int(session.scalar(select(ConfigVersion.version).where(ConfigVersion.id == 1)) or 0)


def build_document(
    session: Session, *, account_ids: Iterable[str] | None = None, now: datetime | None = None
) -> tuple[int, Document]:
    """The whole deployment (or only some accounts, for validating one change) and its version."""
    now = now or datetime.now(UTC)
    only = set(account_ids) if account_ids is not None else None

    def rows(*columns: Any, order: tuple[Any, ...] = ()) -> Any:
        """Plain row tuples, not ORM objects: building 10,000 accounts' worth of objects
        costs more than the whole rest of the document."""
        query = select(*columns).order_by(*order)
        if only is not None:
            query = query.where(columns[0].in_(only))
        return session.execute(query)

    version = current_version(session)
    address_query = select(AddressRow.address, AddressRow.family, AddressRow.kind,
                           AddressRow.data_center)
    if only is not None:  # validating a change: the shared addresses and these accounts' own
        held = select(LocationRow.ipv4).where(LocationRow.account_id.in_(only)).union(
            select(LocationRow.ipv6).where(LocationRow.account_id.in_(only)))
        address_query = address_query.where(
            (AddressRow.kind == "shared") | AddressRow.address.in_(held))
    addresses = session.execute(address_query).all()
    shared_v4: dict[str, list[str]] = defaultdict(list)
    shared_v6: dict[str, str] = {}
    home: dict[str, str] = {}
    for address, family, kind, code in addresses:
        home[address] = code
        if kind == "shared":
            if family == 4:
                shared_v4[code].append(address)
            else:
                shared_v6[code] = address
    data_centers = []
    for code, city, country, region, latitude, longitude, backbone, slot in session.execute(
        select(DataCenterRow.code, DataCenterRow.city, DataCenterRow.country,
               DataCenterRow.region, DataCenterRow.latitude, DataCenterRow.longitude,
               DataCenterRow.backbone, DataCenterRow.slot).order_by(DataCenterRow.slot)
    ):
        entry: dict[str, Any] = {
            "code": code, "city": city, "country": country, "region": region,
            "latitude": latitude, "longitude": longitude,
            "shared_ipv4": sorted(shared_v4.get(code, []), key=ipaddress.ip_address),
            "slot": slot,
        }
        if code in shared_v6:
            entry["shared_ipv6"] = shared_v6[code]
        if backbone:
            entry["backbone"] = backbone
        data_centers.append(entry)

    locations: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for account_id, location_id, ipv4, ipv6, state in rows(
        LocationRow.account_id, LocationRow.id, LocationRow.ipv4, LocationRow.ipv6,
        LocationRow.state, order=(LocationRow.account_id, LocationRow.id),
    ):
        item: dict[str, Any] = {"id": location_id, "pop": home.get(ipv4, "?"), "ipv4": ipv4,
                                "state": state}
        if ipv6:
            item["ipv6"] = ipv6
        locations[account_id].append(item)
    groups_of: dict[tuple[str, str], list[str]] = defaultdict(list)
    for account_id, user_name, group_name in rows(
        MembershipRow.account_id, MembershipRow.user_name, MembershipRow.group_name
    ):
        groups_of[(account_id, user_name)].append(group_name)
    users: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for account_id, name in rows(UserRow.account_id, UserRow.name,
                                 order=(UserRow.account_id, UserRow.name)):
        users[account_id].append(
            {"name": name, "groups": sorted(groups_of.get((account_id, name), []))})
    devices: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for account_id, device_id, user_name, digest in rows(
        DeviceRow.account_id, DeviceRow.id, DeviceRow.user_name, DeviceRow.secret_sha256,
        order=(DeviceRow.id,),
    ):
        devices[account_id].append({"id": device_id, "user": user_name, "secret_sha256": digest})
    policies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for account_id, policy_id, body in rows(
        PolicyRow.account_id, PolicyRow.id, PolicyRow.body,
        order=(PolicyRow.account_id, PolicyRow.position),
    ):
        policies[account_id].append({"id": policy_id, **body})
    routes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for account_id, route_id, kind, via, destinations in rows(
        PrivateRouteRow.account_id, PrivateRouteRow.id, PrivateRouteRow.kind,
        PrivateRouteRow.via, PrivateRouteRow.destinations, order=(PrivateRouteRow.id,),
    ):
        routes[account_id].append({"id": route_id, "kind": kind, "via": via,
                                   "destinations": list(destinations)})
    connectors: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for account_id, tunnel_id, digest in rows(
        TunnelRow.account_id, TunnelRow.id, TunnelRow.token_sha256, order=(TunnelRow.id,),
    ):
        connectors[account_id].append({"id": tunnel_id, "token_sha256": digest})
    accounts = []
    for account_id, name, plan, proxy_tcp, proxy_udp, fallback in rows(
        AccountRow.id, AccountRow.name, AccountRow.plan, AccountRow.proxy_tcp,
        AccountRow.proxy_udp, AccountRow.fallback, order=(AccountRow.id,),
    ):
        accounts.append({
            "id": account_id, "name": name, "plan": plan,
            "network": {"proxy_tcp": proxy_tcp, "proxy_udp": proxy_udp, "fallback": fallback},
            "locations": locations.get(account_id, []),
            "users": users.get(account_id, []),
            "devices": devices.get(account_id, []),
            "policies": policies.get(account_id, []),
            "private_routes": routes.get(account_id, []),
            **({"connectors": connectors[account_id]} if account_id in connectors else {}),
        })
    settings = session.get(DeploymentSettingsRow, 1)
    quarantine = [
        {"address": row.address, "released_by": row.released_by,
         "until": aware(row.until).isoformat()}
        for row in session.scalars(select(QuarantineRow).order_by(QuarantineRow.address))
        if aware(row.until) > now
    ]
    document: Document = {
        "deployment": {
            "quarantine_days": settings.quarantine_days if settings else 30,
            "allow_destinations": list(settings.allow_destinations) if settings else [],
            "control_addresses": list(settings.control_addresses) if settings else [],
        },
        "data_centers": data_centers,
        "accounts": accounts,
        "in_network_origins": [
            {"name": origin.name, "destinations": list(origin.destinations)}
            for origin in session.scalars(select(OriginRow).order_by(OriginRow.name))
        ],
        "quarantine": quarantine,
    }
    return version, document


def _canonical(text: str) -> str:
    return str(ipaddress.ip_network(text) if "/" in text else ipaddress.ip_address(text))


def import_document(session: Session, raw: Mapping[str, Any], *, replace: bool = False) -> None:
    """Load a deployment document (a parsed deployment file) into the store.

    The caller validates it first (`load_document`); the database constraints still apply.
    With `replace`, the current configuration is removed first (tokens and audit stay).
    """
    now = datetime.now(UTC)
    if replace:
        for table in (MembershipRow, DeviceRow, PolicyRow, PrivateRouteRow, TunnelRow, LocationRow,
                      GroupRow, UserRow, QuarantineRow, AccountRow, OriginRow, AddressRow,
                      DataCenterRow):
            session.execute(delete(table))
    for dc in raw.get("data_centers", []):
        session.add(DataCenterRow(
            code=dc["code"], city=dc["city"], country=dc["country"], region=dc.get("region", ""),
            latitude=float(dc["latitude"]), longitude=float(dc["longitude"]),
            backbone=str(dc["backbone"]) if dc.get("backbone") else None, slot=int(dc["slot"]),
        ))
    session.flush()  # no ORM relationships: the unit of work does not order tables for us
    for dc in raw.get("data_centers", []):
        for address in dc.get("shared_ipv4", []):
            session.add(AddressRow(address=_canonical(address), family=4, kind="shared",
                                   data_center=dc["code"]))
        if dc.get("shared_ipv6"):
            session.add(AddressRow(address=_canonical(dc["shared_ipv6"]), family=6,
                                   kind="shared", data_center=dc["code"]))
    session.flush()
    for account in raw.get("accounts", []):
        network = account.get("network", {})
        session.add(AccountRow(
            id=account["id"], name=account.get("name", account["id"]),
            plan=account.get("plan", "free"), proxy_tcp=network.get("proxy_tcp", True),
            proxy_udp=network.get("proxy_udp", False),
            fallback=network.get("fallback", "closed"), created_at=now,
        ))
    session.flush()
    for account in raw.get("accounts", []):
        _import_account(session, account, now)
    for origin in raw.get("in_network_origins", []):
        session.add(OriginRow(name=origin["name"], destinations=list(origin["destinations"])))
    for entry in raw.get("quarantine", []):
        until = entry["until"]
        session.add(QuarantineRow(
            address=_canonical(entry["address"]), released_by=entry["released_by"],
            until=until if isinstance(until, datetime) else datetime.fromisoformat(until),
        ))
    settings = session.get(DeploymentSettingsRow, 1)
    deployment = raw.get("deployment", {})
    if settings is None:
        settings = DeploymentSettingsRow(id=1)
        session.add(settings)
    settings.quarantine_days = int(deployment.get("quarantine_days", 30))
    settings.allow_destinations = list(deployment.get("allow_destinations", []))
    settings.control_addresses = list(deployment.get("control_addresses", []))
    session.flush()


def _import_account(session: Session, account: Mapping[str, Any], now: datetime) -> None:
    account_id = account["id"]
    for loc in account.get("locations", []):
        session.add(AddressRow(address=_canonical(loc["ipv4"]), family=4, kind="dedicated",
                               data_center=loc["pop"]))
        if loc.get("ipv6"):
            session.add(AddressRow(address=_canonical(loc["ipv6"]), family=6, kind="dedicated",
                                   data_center=loc["pop"]))
        session.flush()
        session.add(LocationRow(
            account_id=account_id, id=loc["id"], ipv4=_canonical(loc["ipv4"]),
            ipv6=_canonical(loc["ipv6"]) if loc.get("ipv6") else None,
            state=loc.get("state", "active"), assigned_at=now,
        ))
    groups = sorted({group for user in account.get("users", []) for group in user.get("groups", [])})
    for group in groups:
        session.add(GroupRow(account_id=account_id, name=group))
    for user in account.get("users", []):
        session.add(UserRow(account_id=account_id, name=user["name"]))
    session.flush()
    for user in account.get("users", []):
        for group in user.get("groups", []):
            session.add(MembershipRow(account_id=account_id, user_name=user["name"],
                                      group_name=group))
    for device in account.get("devices", []):
        session.add(DeviceRow(id=device["id"], account_id=account_id, user_name=device["user"],
                              secret_sha256=device["secret_sha256"], created_at=now))
    for position, policy in enumerate(account.get("policies", [])):
        body = {key: value for key, value in policy.items() if key != "id"}
        session.add(PolicyRow(account_id=account_id, id=policy["id"], position=position, body=body))
    for connector in account.get("connectors", []):
        session.add(TunnelRow(id=connector["id"], account_id=account_id,
                              token_sha256=connector["token_sha256"], created_at=now,
                              token_issued_at=now))
    for route in account.get("private_routes", []):
        session.add(PrivateRouteRow(
            account_id=account_id, id=route["id"], kind=route.get("kind", "tunnel"),
            via=route["via"], destinations=list(route.get("destinations", [])),
        ))
