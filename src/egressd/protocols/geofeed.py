"""RFC 8805 self-published IP geolocation feeds ("geofeeds"): format, parse, look up.

The control plane publishes one so that origins place every shared and dedicated address
in the city it should appear in (rule R10); the echo origin loads it to show that city.

A feed is UTF-8 CSV (RFC 4180 quoting), one prefix per line:
``ip_prefix,alpha2code,region,city,postal_code``. Lines starting with ``#`` and blank
lines are ignored. Only the prefix is required; trailing empty fields may be omitted.
The region is an ISO 3166-2 code (``US-CA``) and must agree with the country.

What it does not know: where the feed comes from (HTTP, file), whether the publisher
is authoritative for a prefix (RFC 9092), and country or region *names*: codes are
checked for shape, not against the ISO lists, which change.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "GeofeedEntry",
    "GeofeedError",
    "GeofeedIndex",
    "format_geofeed",
    "parse_geofeed",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: CIDR as RFC 8805 writes it: an address and a decimal length. Python's ipaddress would
#: also take netmasks (/255.255.255.0) and IPv6 zones (2001:db8::%eth0), which are not
#: prefixes (and a zone makes a second, unequal copy of one).
_PREFIX: Final = re.compile(r"[0-9A-Fa-f:.]+(?:/[0-9]{1,3})?")
_COUNTRY: Final = re.compile(r"[A-Z]{2}")
_REGION: Final = re.compile(r"([A-Z]{2})-[A-Z0-9]{1,3}")
_FIELDS: Final = ("ip_prefix", "alpha2code", "region", "city", "postal_code")
DEFAULT_HEADER: Final = "RFC 8805 geofeed: " + ",".join(_FIELDS)


class GeofeedError(ValueError):
    """A feed line is malformed; ``line_number`` is 1-based, ``line`` its text."""

    def __init__(self, line_number: int, line: str, reason: str) -> None:
        super().__init__(f"geofeed line {line_number}: {reason}: {line!r}")
        self.line_number = line_number
        self.line = line
        self.reason = reason


#: Control characters (C0, DEL, C1) and the line and paragraph separators: in a field
#: they would end the feed line early for a reader that splits lines like str.splitlines().
_LINE_BREAKING: Final = frozenset({"Cc", "Zl", "Zp"})


def _check_text(name: str, value: str) -> None:
    if any(unicodedata.category(char) in _LINE_BREAKING for char in value):
        raise ValueError(f"{name} {value!r} contains a control character or line separator")
    if value != value.strip():
        raise ValueError(f"{name} {value!r} has leading or trailing whitespace")


@dataclass(frozen=True, slots=True)
class GeofeedEntry:
    """Where addresses in ``prefix`` should appear. Empty strings mean "not said".

    Codes are upper case: ``country`` ISO 3166-1 alpha-2 (``US``), ``region`` ISO
    3166-2 (``US-CA``). ``postal`` is deprecated by RFC 8805 and best left empty.
    """

    prefix: IPNetwork
    country: str
    region: str
    city: str
    postal: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise TypeError(f"prefix must be an IPv4Network or IPv6Network, not {self.prefix!r}")
        if self.country and not _COUNTRY.fullmatch(self.country):
            raise ValueError(
                f"country {self.country!r} is not a 2-letter upper-case ISO 3166-1 code"
            )
        if self.region:
            match = _REGION.fullmatch(self.region)
            if match is None:
                raise ValueError(f"region {self.region!r} is not an ISO 3166-2 code like US-CA")
            if match.group(1) != self.country:
                raise ValueError(
                    f"region {self.region!r} does not belong to country {self.country!r}"
                )
        _check_text("city", self.city)
        _check_text("postal code", self.postal)


def format_geofeed(entries: Iterable[GeofeedEntry], *, header: str = DEFAULT_HEADER) -> str:
    """The feed text, entries in the given order, after ``header`` as ``#`` comments."""
    buffer = io.StringIO()
    for comment_line in header.splitlines():
        buffer.write(f"# {comment_line}".rstrip() + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    for entry in entries:
        writer.writerow(
            [entry.prefix.with_prefixlen, entry.country, entry.region, entry.city, entry.postal]
        )
    return buffer.getvalue()


def _parse_line(line_number: int, line: str) -> GeofeedEntry:
    try:
        (fields,) = list(csv.reader([line], strict=True))
    except (csv.Error, ValueError) as error:
        raise GeofeedError(line_number, line, f"bad CSV ({error})") from None
    if len(fields) > len(_FIELDS):
        raise GeofeedError(
            line_number, line, f"{len(fields)} fields, expected at most {len(_FIELDS)}"
        )
    fields = [field.strip() for field in fields] + [""] * (len(_FIELDS) - len(fields))
    prefix_text, country, region, city, postal = fields
    if not prefix_text:
        raise GeofeedError(line_number, line, "missing ip_prefix")
    if _PREFIX.fullmatch(prefix_text) is None:
        raise GeofeedError(line_number, line, f"bad ip_prefix {prefix_text!r} (not address/length)")
    try:
        prefix = ipaddress.ip_network(prefix_text, strict=True)
    except ValueError as error:
        raise GeofeedError(line_number, line, f"bad ip_prefix {prefix_text!r} ({error})") from None
    try:
        return GeofeedEntry(prefix, country.upper(), region.upper(), city, postal)
    except ValueError as error:
        raise GeofeedError(line_number, line, str(error)) from None


def parse_geofeed(text: str) -> list[GeofeedEntry]:
    """Parse a whole feed; :class:`GeofeedError` names the first bad line.

    Codes are accepted in any case and returned upper case. A prefix listed twice is an
    error: a feed that says two things about one prefix says nothing reliable. Lines end
    at LF (CRLF too); any other line or paragraph separator is part of its line, where
    it is an error.
    """
    entries: list[GeofeedEntry] = []
    first_seen: dict[IPNetwork, int] = {}
    for line_number, raw_line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        entry = _parse_line(line_number, line)
        if entry.prefix in first_seen:
            raise GeofeedError(
                line_number,
                line,
                f"prefix {entry.prefix} already listed on line {first_seen[entry.prefix]}",
            )
        first_seen[entry.prefix] = line_number
        entries.append(entry)
    return entries


class GeofeedIndex:
    """Longest-prefix match of an address against a feed.

    One dict per (family, prefix length), keyed by the prefix's network bits, probed
    from the longest length down: a lookup costs at most one dict probe per distinct
    length present (a handful in practice), whatever the feed's size.
    """

    def __init__(self, entries: Iterable[GeofeedEntry] = ()) -> None:
        by_length: dict[tuple[int, int], dict[int, GeofeedEntry]] = {}
        count = 0
        for entry in entries:
            prefix = entry.prefix
            bits = prefix.max_prefixlen
            table = by_length.setdefault((prefix.version, prefix.prefixlen), {})
            key = int(prefix.network_address) >> (bits - prefix.prefixlen)
            if key in table:
                raise ValueError(f"prefix {prefix} is listed twice")
            table[key] = entry
            count += 1
        self._count = count
        self._tables: dict[int, tuple[tuple[int, dict[int, GeofeedEntry]], ...]] = {}
        for version, bits in ((4, 32), (6, 128)):
            lengths = sorted(
                (length for (table_version, length) in by_length if table_version == version),
                reverse=True,
            )
            self._tables[version] = tuple(
                (bits - length, by_length[(version, length)]) for length in lengths
            )

    @classmethod
    def from_text(cls, text: str) -> GeofeedIndex:
        """Parse a feed and index it."""
        return cls(parse_geofeed(text))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[GeofeedEntry]:
        for tables in self._tables.values():
            for _shift, table in tables:
                yield from table.values()

    def lookup(self, address: str | IPAddress) -> GeofeedEntry | None:
        """The entry of the longest prefix holding ``address``, or None.

        An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, as dual-stack sockets report
        IPv4 peers) is looked up as IPv4. Raises ValueError for a non-address string.
        """
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        for shift, table in self._tables[ip.version]:
            entry = table.get(value >> shift)
            if entry is not None:
                return entry
        return None
