"""The deployment document -> a validated Snapshot, with every error located where it can be.

The same reader validates the deployment file (TOML, `load_deployment`, errors located by
line) and the JSON document the control plane distributes to the PoPs (`load_document`,
no lines). Parsing is pure (text or mapping in, snapshot or errors out); reading the file
is the caller's job. Type errors (a bad address, a missing key) and rule errors (R2, R3,
...) are collected together, so one `egressd config check` run shows everything that
needs fixing.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from egressd.model.accounts import (
    Account,
    DedicatedLocation,
    Device,
    Fallback,
    LocationState,
    NetworkSettings,
    Plan,
    User,
)
from egressd.model.deployment_reader import (
    ACCOUNT_KEYS,
    CONNECTOR_KEYS,
    DATA_CENTER_KEYS,
    DEVICE_KEYS,
    LOCATION_KEYS,
    NETWORK_KEYS,
    POLICY_KEYS,
    QUARANTINE_KEYS,
    ROUTE_KEYS,
    SETTINGS_KEYS,
    TOP_KEYS,
    USER_KEYS,
    Reader,
    Table,
    parse_ports,
)
from egressd.model.errors import ValidationError, ValidationIssue
from egressd.model.policy import (
    DedicatedAction,
    EgressPolicy,
    PolicyAction,
    Selector,
    SharedAction,
)
from egressd.model.routes import Connector, InNetworkOrigin, PrivateRoute, RouteKind
from egressd.model.snapshot import DeploymentSettings, Quarantine, Snapshot, build_snapshot
from egressd.model.topology import DataCenter

__all__ = [
    "ACCOUNT_KEYS",
    "DATA_CENTER_KEYS",
    "DEVICE_KEYS",
    "LOCATION_KEYS",
    "NETWORK_KEYS",
    "POLICY_KEYS",
    "ROUTE_KEYS",
    "TOP_KEYS",
    "USER_KEYS",
    "DeploymentError",
    "LocatedIssue",
    "load_deployment",
    "load_document",
    "locate",
    "parse_ports",
]


@dataclass(frozen=True, slots=True)
class LocatedIssue:
    issue: ValidationIssue
    line: int | None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.issue}"


class DeploymentError(ValidationError):
    """Validation issues of a deployment document, each with its line in `text` where it
    can be found (None without text: a JSON document has no lines worth naming)."""

    def __init__(self, issues: list[ValidationIssue], text: str | None = None) -> None:
        super().__init__(issues)
        self.located = tuple(
            LocatedIssue(issue, locate(text, issue.path) if text is not None else None)
            for issue in issues
        )

    def __str__(self) -> str:
        return "\n".join(str(item) for item in self.located)


def load_deployment(text: str, *, version: int = 1, now: datetime | None = None) -> Snapshot:
    """Parse and validate a deployment file (TOML). Raises DeploymentError with every
    issue, located by line."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        error = DeploymentError([ValidationIssue("(file)", f"not valid TOML: {exc}")], text)
        line = re.search(r"at line (\d+)", str(exc))
        if line:
            error.located = (LocatedIssue(error.issues[0], int(line.group(1))),)
        raise error from exc
    return _build(raw, version=version, now=now, text=text)


def load_document(
    raw: Mapping[str, Any], *, version: int, now: datetime | None = None
) -> Snapshot:
    """Validate a JSON-compatible deployment document (the schema of the deployment file;
    quarantine `until` as an ISO-8601 string) into snapshot `version`. This is what a PoP
    runs on the document the control plane sends. Raises DeploymentError (no lines)."""
    if not isinstance(raw, Mapping):
        issue = ValidationIssue("(document)", f"expected an object, got {type(raw).__name__}")
        raise DeploymentError([issue])
    return _build(raw, version=version, now=now, text=None)


def _build(raw: Table, *, version: int, now: datetime | None, text: str | None) -> Snapshot:
    reader = Reader()
    reader.known_keys(raw, "", TOP_KEYS)
    dcs = [
        _data_center(reader, table, index)
        for index, table in enumerate(reader.tables(raw, "data_centers", ""))
    ]
    account_tables = reader.tables(raw, "accounts", "")
    accounts = [_account(reader, table) for table in account_tables]
    routes = [route for table in account_tables for route in _routes(reader, table)]
    connectors = [item for table in account_tables for item in _connectors(reader, table)]
    origins = []
    for table in reader.tables(raw, "in_network_origins", ""):
        name = str(table.get("name", "?"))
        reader.known_keys(table, f"in_network_origins[{name}]", {"name", "destinations"})
        nets, hosts = reader.destinations(
            reader.strings(table, "destinations", f"in_network_origins[{name}]"),
            f"in_network_origins[{name}].destinations",
        )
        origins.append(InNetworkOrigin(name=name, networks=nets, hostnames=hosts))
    quarantine = []
    for table in reader.tables(raw, "quarantine", ""):
        where = f"quarantine[{table.get('address', '?')}]"
        reader.known_keys(table, where, QUARANTINE_KEYS)
        address = reader.convert(
            table.get("address"), f"{where}.address", _address_or_network, "address"
        )
        until = reader.timestamp(table, "until", where)
        released_by = reader.get(table, "released_by", where, str)
        if address is not None and until is not None and released_by is not None:
            quarantine.append(Quarantine(address=address, released_by=released_by, until=until))
    settings_table = reader.table(raw, "deployment", "")
    reader.known_keys(settings_table, "deployment", SETTINGS_KEYS)
    quarantine_days = reader.get(settings_table, "quarantine_days", "deployment", int, 30)
    if quarantine_days is not None and quarantine_days < 0:
        reader.issues.append(
            ValidationIssue("deployment.quarantine_days", "must be 0 or more days", "R2")
        )
    settings = DeploymentSettings(
        quarantine_days=30 if quarantine_days is None else quarantine_days,
        allow_destinations=reader.networks_only(settings_table, "allow_destinations", "deployment"),
        control_addresses=reader.networks_only(settings_table, "control_addresses", "deployment"),
    )
    try:
        snapshot = build_snapshot(
            version=version,
            data_centers=[dc for dc in dcs if dc is not None],
            accounts=[account for account in accounts if account is not None],
            routes=routes,
            connectors=connectors,
            origins=origins,
            quarantine=quarantine,
            settings=settings,
            now=now or datetime.now(UTC),
        )
    except ValidationError as exc:
        # Rule errors too, in the same run; skip those under a field that already failed to
        # parse (they would only repeat it).
        failed = [issue.path for issue in reader.issues]
        extra = [issue for issue in exc.issues
                 if not any(issue.path.startswith(path) for path in failed)]
        raise DeploymentError(reader.issues + extra, text) from exc
    if reader.issues:
        raise DeploymentError(reader.issues, text)
    return snapshot


def _address_or_network(value: Any) -> Any:
    return ipaddress.ip_network(value) if "/" in str(value) else ipaddress.ip_address(value)


def _data_center(reader: Reader, table: Table, index: int) -> DataCenter | None:
    code = reader.get(table, "code", f"data_centers[{index}]", str)
    where = f"data_centers[{code or index}]"
    reader.known_keys(table, where, DATA_CENTER_KEYS)
    city = reader.get(table, "city", where, str)
    country = reader.get(table, "country", where, str)
    lat = reader.get(table, "latitude", where, float)
    lon = reader.get(table, "longitude", where, float)
    shared_v4 = [
        reader.convert(value, f"{where}.shared_ipv4", ipaddress.IPv4Address, "IPv4 address")
        for value in reader.strings(table, "shared_ipv4", where)
    ]
    shared_v6 = None
    if "shared_ipv6" in table:
        shared_v6 = reader.convert(
            table["shared_ipv6"], f"{where}.shared_ipv6", ipaddress.IPv6Network, "IPv6 prefix"
        )
    backbone = None
    if "backbone" in table:
        backbone = reader.convert(
            table["backbone"], f"{where}.backbone", ipaddress.ip_address, "address"
        )
    slot = reader.get(table, "slot", where, int, index + 1)
    if (
        code is None
        or city is None
        or country is None
        or lat is None
        or lon is None
        or slot is None
    ):
        return None
    return DataCenter(
        code=code,
        city=city,
        country=country,
        region=str(table.get("region", "")),
        latitude=lat,
        longitude=lon,
        shared_ipv4=tuple(address for address in shared_v4 if address is not None),
        shared_ipv6=shared_v6,
        backbone_address=backbone,
        slot=slot,
    )


def _account(reader: Reader, table: Table) -> Account | None:
    account_id = reader.get(table, "id", "accounts[?]", str)
    where = f"accounts[{account_id}]"
    reader.known_keys(table, where, ACCOUNT_KEYS)
    plan = reader.enum(table, "plan", where, Plan, Plan.FREE)
    network = reader.table(table, "network", where)
    reader.known_keys(network, f"{where}.network", NETWORK_KEYS)
    settings = NetworkSettings(
        proxy_tcp=reader.get(network, "proxy_tcp", f"{where}.network", bool, True) is True,
        proxy_udp=reader.get(network, "proxy_udp", f"{where}.network", bool, False) is True,
        fallback=reader.enum(network, "fallback", f"{where}.network", Fallback, Fallback.CLOSED),
    )
    locations = []
    for loc in reader.tables(table, "locations", f"{where}."):
        lid = reader.get(loc, "id", f"{where}.locations[?]", str)
        lwhere = f"{where}.locations[{lid}]"
        reader.known_keys(loc, lwhere, LOCATION_KEYS)
        pop = reader.get(loc, "pop", lwhere, str)
        v4 = reader.convert(
            loc.get("ipv4"), f"{lwhere}.ipv4", ipaddress.IPv4Address, "IPv4 address"
        )
        v6 = (
            reader.convert(loc["ipv6"], f"{lwhere}.ipv6", ipaddress.IPv6Network, "IPv6 prefix")
            if "ipv6" in loc
            else None
        )
        state = reader.enum(loc, "state", lwhere, LocationState, LocationState.ACTIVE)
        if lid and pop and v4:
            locations.append(DedicatedLocation(id=lid, home_pop=pop, ipv4=v4, ipv6=v6, state=state))
    users = []
    for user_table in reader.tables(table, "users", f"{where}."):
        name = reader.get(user_table, "name", f"{where}.users[?]", str)
        reader.known_keys(user_table, f"{where}.users[{name}]", USER_KEYS)
        groups = reader.strings(user_table, "groups", f"{where}.users[{name}]")
        if name:
            users.append(User(name=name, groups=frozenset(groups)))
    devices = []
    for dev in reader.tables(table, "devices", f"{where}."):
        did = reader.get(dev, "id", f"{where}.devices[?]", str)
        dwhere = f"{where}.devices[{did}]"
        reader.known_keys(dev, dwhere, DEVICE_KEYS)
        user = reader.get(dev, "user", dwhere, str)
        digest = reader.get(dev, "secret_sha256", dwhere, str)
        if did and user and digest:
            devices.append(Device(id=did, user=user, secret_sha256=digest.lower()))
    policies = [
        _policy(reader, policy, where) for policy in reader.tables(table, "policies", f"{where}.")
    ]
    if account_id is None:
        return None
    return Account(
        id=account_id,
        name=str(table.get("name", account_id)),
        plan=plan,
        settings=settings,
        locations=tuple(locations),
        users=tuple(users),
        devices=tuple(devices),
        policies=tuple(policy for policy in policies if policy is not None),
    )


def _policy(reader: Reader, table: Table, account_where: str) -> EgressPolicy | None:
    pid = reader.get(table, "id", f"{account_where}.policies[?]", str)
    where = f"{account_where}.policies[{pid}]"
    reader.known_keys(table, where, POLICY_KEYS)
    networks, hostnames = reader.destinations(
        reader.strings(table, "destinations", where), f"{where}.destinations"
    )
    ports_raw = table.get("ports", [])
    if not isinstance(ports_raw, list | tuple):
        reader.issues.append(
            ValidationIssue(f"{where}.ports", 'expected a list, e.g. ports = ["443", "8000-8080"]')
        )
        ports_raw = []
    selector = Selector(
        users=frozenset(reader.strings(table, "users", where)),
        groups=frozenset(reader.strings(table, "groups", where)),
        devices=frozenset(reader.strings(table, "devices", where)),
        networks=networks,
        hostnames=hostnames,
        ports=parse_ports(list(ports_raw), reader, f"{where}.ports"),
        protocols=frozenset(reader.strings(table, "protocols", where)),
        connected_pops=frozenset(reader.strings(table, "connected_pops", where)),
    )
    kind = table.get("action")
    action: PolicyAction
    if kind == "shared":
        action = SharedAction()
    elif kind == "dedicated":
        primary = reader.get(table, "primary", where, str)
        secondary = reader.get(table, "secondary", where, str)
        ipv6 = reader.get(table, "ipv6", where, str, primary)
        if primary is None or secondary is None or ipv6 is None:
            return None
        action = DedicatedAction(primary=primary, secondary=secondary, ipv6=ipv6)
    else:
        reader.issues.append(
            ValidationIssue(f"{where}.action", f"expected 'shared' or 'dedicated', got {kind!r}")
        )
        return None
    if pid is None:
        return None
    return EgressPolicy(id=pid, selector=selector, action=action, name=str(table.get("name", "")))


def _routes(reader: Reader, table: Table) -> list[PrivateRoute]:
    account_id = str(table.get("id", "?"))
    routes = []
    for route in reader.tables(table, "private_routes", f"accounts[{account_id}]."):
        rid = reader.get(route, "id", f"accounts[{account_id}].private_routes[?]", str)
        where = f"accounts[{account_id}].private_routes[{rid}]"
        reader.known_keys(route, where, ROUTE_KEYS)
        kind = reader.enum(route, "kind", where, RouteKind, RouteKind.TUNNEL)
        via = reader.get(route, "via", where, str)
        nets, hosts = reader.destinations(
            reader.strings(route, "destinations", where), f"{where}.destinations"
        )
        if rid and via:
            routes.append(
                PrivateRoute(
                    id=rid, account=account_id, kind=kind, networks=nets, hostnames=hosts, via=via
                )
            )
    return routes


_SEGMENT = re.compile(r"(\w+)(?:\[([^\]]*)\])?")


def locate(text: str, path: str) -> int | None:
    """Best-effort line number (1-based) of a dotted issue path like `accounts[acme].locations[lax].ipv4`."""
    lines = text.splitlines()
    line = 0
    found: int | None = None
    for segment in path.split("."):
        match = _SEGMENT.fullmatch(segment)
        if not match:
            return found
        name, key = match.groups()
        if key is not None:
            header = re.compile(rf"^\s*\[\[\s*([\w.]+\.)?{re.escape(name)}\s*\]\]")
            ident = re.compile(rf"^\s*(id|code|name|address)\s*=\s*\"{re.escape(key)}\"")
            matched = False
            for number in range(line, len(lines)):
                if not header.match(lines[number]):
                    continue
                for inner in range(number + 1, min(len(lines), number + 40)):
                    if ident.match(lines[inner]):
                        line, found, matched = inner, inner + 1, True
                        break
                    if lines[inner].lstrip().startswith("["):
                        break
                if matched:
                    break
        else:
            assign = re.compile(rf"^\s*{re.escape(name)}\s*=")
            for number in range(line, len(lines)):
                if number > line and lines[number].lstrip().startswith("[["):
                    break
                if assign.match(lines[number]):
                    return number + 1
    return found


def _connectors(reader: Reader, table: Table) -> list[Connector]:
    """`[[accounts.connectors]]`: tunnel connectors (id, SHA-256 of their token)."""
    account_id = str(table.get("id", "?"))
    connectors = []
    for entry in reader.tables(table, "connectors", f"accounts[{account_id}]."):
        cid = reader.get(entry, "id", f"accounts[{account_id}].connectors[?]", str)
        where = f"accounts[{account_id}].connectors[{cid}]"
        reader.known_keys(entry, where, CONNECTOR_KEYS)
        digest = reader.get(entry, "token_sha256", where, str)
        if cid and digest:
            connectors.append(Connector(id=cid, account=account_id, token_sha256=digest.lower()))
    return connectors
