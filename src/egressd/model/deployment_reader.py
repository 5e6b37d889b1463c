"""Typed reading of a parsed deployment document (from TOML or JSON), collecting issues.

`Reader` reads values out of nested mappings and lists and records a `ValidationIssue`
instead of raising, so one pass reports everything; `egressd.model.deployment` builds the
snapshot with it. The schema's key sets live here too.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from egressd.model.addresses import IPNetwork
from egressd.model.errors import ValidationIssue
from egressd.model.lookup import normalise_hostname

T = TypeVar("T")
Table = Mapping[str, Any]

_HOSTNAME = re.compile(
    r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$"
)

TOP_KEYS = {"deployment", "data_centers", "accounts", "in_network_origins", "quarantine"}
DATA_CENTER_KEYS = {
    "code",
    "city",
    "country",
    "region",
    "latitude",
    "longitude",
    "shared_ipv4",
    "shared_ipv6",
    "backbone",
    "slot",
}
ACCOUNT_KEYS = {
    "id",
    "name",
    "plan",
    "network",
    "locations",
    "users",
    "devices",
    "policies",
    "private_routes",
    "connectors",
}
NETWORK_KEYS = {"proxy_tcp", "proxy_udp", "fallback"}
LOCATION_KEYS = {"id", "pop", "ipv4", "ipv6", "state"}
USER_KEYS = {"name", "groups"}
DEVICE_KEYS = {"id", "user", "secret_sha256"}
POLICY_KEYS = {
    "id",
    "name",
    "users",
    "groups",
    "devices",
    "destinations",
    "ports",
    "protocols",
    "connected_pops",
    "action",
    "primary",
    "secondary",
    "ipv6",
}
ROUTE_KEYS = {"id", "kind", "via", "destinations"}
CONNECTOR_KEYS = {"id", "token_sha256"}
QUARANTINE_KEYS = {"address", "released_by", "until"}
SETTINGS_KEYS = {"quarantine_days", "allow_destinations", "control_addresses"}


def _is_list(value: object) -> bool:
    """A TOML or JSON array (a Python producer may hand in a tuple)."""
    return isinstance(value, list | tuple)


class Reader:
    """Reads typed values out of the parsed document, recording an issue instead of raising."""

    def __init__(self) -> None:
        self.issues: list[ValidationIssue] = []

    def known_keys(self, table: Table, where: str, allowed: set[str]) -> None:
        """An unknown key is an error: a misspelt selector would otherwise match everything."""
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                path = f"{where}.{key}" if where else str(key)
                self.issues.append(ValidationIssue(path, f"unknown key {key!r}{hint}"))

    def table(self, parent: Table, key: str, where: str) -> Table:
        value = parent.get(key, {})
        if not isinstance(value, Mapping):
            path = f"{where}.{key}" if where else key
            self.issues.append(
                ValidationIssue(path, f"expected a table ([{key}]), got {type(value).__name__}")
            )
            return {}
        return value

    def networks_only(self, table: Table, key: str, where: str) -> tuple[IPNetwork, ...]:
        networks, hostnames = self.destinations(self.strings(table, key, where), f"{where}.{key}")
        for name in hostnames:
            self.issues.append(
                ValidationIssue(
                    f"{where}.{key}",
                    f"{name!r}: only addresses and CIDRs are allowed here, not hostnames",
                )
            )
        return networks

    def get(
        self, table: Table, key: str, where: str, kind: type[T], default: T | None = None
    ) -> T | None:
        if key not in table:
            if default is None:
                self.issues.append(ValidationIssue(f"{where}.{key}", "missing"))
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.issues.append(
                ValidationIssue(
                    f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}"
                )
            )
            return default
        return value

    def convert(self, value: Any, where: str, parse: Callable[[Any], T], what: str) -> T | None:
        if not isinstance(value, str):
            shown = "nothing" if value is None else f"{type(value).__name__} {value!r}"
            self.issues.append(
                ValidationIssue(where, f"expected a {what} as a string, got {shown}")
            )
            return None
        try:
            return parse(value)
        except (ValueError, TypeError) as exc:
            self.issues.append(ValidationIssue(where, f"not a valid {what}: {value!r} ({exc})"))
            return None

    def strings(self, table: Table, key: str, where: str) -> list[str]:
        value = table.get(key, [])
        if not _is_list(value) or not all(isinstance(item, str) for item in value):
            self.issues.append(ValidationIssue(f"{where}.{key}", "expected a list of strings"))
            return []
        return list(value)

    def tables(self, table: Table, key: str, where: str) -> list[Table]:
        value = table.get(key, [])
        if not _is_list(value) or not all(isinstance(item, Mapping) for item in value):
            self.issues.append(
                ValidationIssue(f"{where}{key}", "expected an array of tables ([[...]])")
            )
            return []
        return list(value)

    def enum(
        self, table: Table, key: str, where: str, kind: Callable[[str], T], default: T
    ) -> T:
        raw = table.get(key)
        if raw is None:
            return default
        try:
            return kind(raw)
        except ValueError:
            choices = ", ".join(str(getattr(member, "value", member)) for member in kind)  # type: ignore[attr-defined]
            self.issues.append(
                ValidationIssue(f"{where}.{key}", f"{raw!r} is not one of: {choices}")
            )
            return default

    def timestamp(self, table: Table, key: str, where: str) -> datetime | None:
        """A TOML date-time or an ISO-8601 string (JSON has no date type); naive means UTC."""
        value = table.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            shown = "nothing" if value is None else repr(value)
            self.issues.append(
                ValidationIssue(
                    f"{where}.{key}",
                    f"expected a date-time (TOML, or an ISO-8601 string), got {shown}",
                )
            )
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def destinations(
        self, values: list[str], where: str
    ) -> tuple[tuple[IPNetwork, ...], tuple[str, ...]]:
        networks: list[IPNetwork] = []
        hostnames: list[str] = []
        for value in values:
            if any(char in value for char in "/:") or value.replace(".", "").isdigit():
                network = self.convert(
                    value, where, lambda v: ipaddress.ip_network(v, strict=True), "CIDR"
                )
                if network is not None:
                    networks.append(network)
            elif _HOSTNAME.match(normalise_hostname(value)):
                hostnames.append(normalise_hostname(value))
            else:
                self.issues.append(
                    ValidationIssue(where, f"not a CIDR or hostname pattern: {value!r}")
                )
        return tuple(networks), tuple(hostnames)


def parse_ports(
    values: list[str] | list[int], reader: Reader, where: str
) -> tuple[tuple[int, int], ...]:
    ranges = []
    for value in values:
        text = str(value)
        match = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", text)
        if not match:
            reader.issues.append(ValidationIssue(where, f"not a port or port range: {text!r}"))
            continue
        low = int(match.group(1))
        high = int(match.group(2) or low)
        ranges.append((low, high))
    return tuple(ranges)
