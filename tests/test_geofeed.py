"""RFC 8805 geofeed codec: round trips, precise errors, longest-prefix lookup."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_network

import pytest

from egressd.protocols.geofeed import (
    GeofeedEntry,
    GeofeedError,
    GeofeedIndex,
    format_geofeed,
    parse_geofeed,
)

ENTRIES = [
    GeofeedEntry(ip_network("192.0.2.0/24"), "US", "US-CA", "Los Angeles"),
    GeofeedEntry(ip_network("192.0.2.128/25"), "US", "US-NV", "Las Vegas"),
    GeofeedEntry(ip_network("198.51.100.7/32"), "US", "US-NY", "New York", "10001"),
    GeofeedEntry(ip_network("2001:db8::/32"), "CH", "CH-ZH", "Zürich"),
    GeofeedEntry(ip_network("2001:db8:1::/48"), "FR", "FR-IDF", "Paris, Île-de-France"),
    GeofeedEntry(ip_network("203.0.113.0/24"), "", "", ""),
]


def test_format_parse_round_trip() -> None:
    text = format_geofeed(ENTRIES)
    assert text.startswith("# RFC 8805 geofeed: ip_prefix,alpha2code,region,city,postal_code\n")
    assert parse_geofeed(text) == ENTRIES


def test_format_layout() -> None:
    text = format_geofeed(ENTRIES[2:5], header="egressd\nsecond line")
    assert text.splitlines() == [
        "# egressd",
        "# second line",
        "198.51.100.7/32,US,US-NY,New York,10001",
        "2001:db8::/32,CH,CH-ZH,Zürich,",
        '2001:db8:1::/48,FR,FR-IDF,"Paris, Île-de-France",',
    ]


def test_parse_tolerates_what_publishers_write() -> None:
    text = (
        "\ufeff# comment\r\n"
        "\r\n"
        "   # indented comment\n"
        "192.0.2.5,us,us-ca,Los Angeles\r\n"  # bare address, lower case, no postal field
        " 2001:db8::/32 , CH , CH-ZH , Zürich , \n"
        "198.51.100.0/24\n"  # only the prefix
        "203.0.113.0/24,US,,\n"
    )
    assert parse_geofeed(text) == [
        GeofeedEntry(ip_network("192.0.2.5/32"), "US", "US-CA", "Los Angeles"),
        GeofeedEntry(ip_network("2001:db8::/32"), "CH", "CH-ZH", "Zürich"),
        GeofeedEntry(ip_network("198.51.100.0/24"), "", "", ""),
        GeofeedEntry(ip_network("203.0.113.0/24"), "US", "", ""),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("192.0.2.0/33,US,US-CA,Los Angeles,", "bad ip_prefix '192.0.2.0/33'"),
        ("192.0.2.1/24,US,US-CA,Los Angeles,", "has host bits set"),
        ("not-an-ip,US,,,", "bad ip_prefix 'not-an-ip'"),
        ("2001:db8::%eth0,US,,,", "not address/length"),
        ("2001:db8::%1/128,US,,,", "not address/length"),
        ("192.0.2.0/255.255.255.0,US,,,", "not address/length"),
        ("192.0.2.0/0.0.0.255,US,,,", "not address/length"),
        ("192.0.2.0/+24,US,,,", "not address/length"),
        (",US,US-CA,,", "missing ip_prefix"),
        ("192.0.2.0/24,USA,,,", "country 'USA'"),
        ("192.0.2.0/24,U1,,,", "country 'U1'"),
        ("192.0.2.0/24,US,California,,", "region 'CALIFORNIA' is not an ISO 3166-2 code"),
        ("192.0.2.0/24,US,CA-QC,Montreal,", "does not belong to country 'US'"),
        ("192.0.2.0/24,,US-CA,,", "does not belong to country ''"),
        ("192.0.2.0/24,US,US-CA,Los Angeles,90001,extra", "6 fields, expected at most 5"),
        ('192.0.2.0/24,US,US-CA,"Los Angeles', "bad CSV"),
    ],
)
def test_errors_name_the_line(line: str, reason: str) -> None:
    text = "# header\n198.51.100.0/24,US,US-NY,New York,\n\n" + line + "\n"
    with pytest.raises(GeofeedError) as caught:
        parse_geofeed(text)
    error = caught.value
    assert error.line_number == 4
    assert error.line == line
    assert reason in error.reason
    assert str(error).startswith("geofeed line 4: ")


def test_duplicate_prefix_names_both_lines() -> None:
    text = "192.0.2.0/24,US,,,\n198.51.100.0/24,US,,,\n192.0.2.0/24,FR,,,\n"
    with pytest.raises(GeofeedError, match=r"line 3: prefix 192.0.2.0/24 already listed on line 1"):
        parse_geofeed(text)


def test_geofeed_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_geofeed("bogus\n")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"country": "us"}, "upper-case"),
        ({"region": "US-TOOLONG"}, "ISO 3166-2"),
        ({"city": "Los\nAngeles"}, "control character"),
        ({"city": " Los Angeles"}, "whitespace"),
        ({"postal": "9000\t1"}, "control character"),
    ],
)
def test_entry_validation(kwargs: dict[str, str], message: str) -> None:
    fields = {"country": "US", "region": "US-CA", "city": "Los Angeles", "postal": ""}
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        GeofeedEntry(ip_network("192.0.2.0/24"), **fields)


def test_entry_needs_a_network() -> None:
    with pytest.raises(TypeError):
        GeofeedEntry("192.0.2.0/24", "US", "", "")  # type: ignore[arg-type]


# --- lookup ---------------------------------------------------------------------------------


@pytest.fixture
def index() -> GeofeedIndex:
    return GeofeedIndex(
        [
            *ENTRIES,
            GeofeedEntry(ip_network("0.0.0.0/0"), "ZZ", "", "default"),
            GeofeedEntry(ip_network("2001:db8:1:2::/64"), "FR", "FR-IDF", "Paris 2"),
        ]
    )


@pytest.mark.parametrize(
    ("address", "city"),
    [
        ("192.0.2.1", "Los Angeles"),
        ("192.0.2.127", "Los Angeles"),
        ("192.0.2.128", "Las Vegas"),  # the /25 beats the /24
        ("192.0.2.255", "Las Vegas"),
        ("198.51.100.7", "New York"),
        ("198.51.100.8", "default"),  # only 0.0.0.0/0 holds it
        ("203.0.113.9", ""),
        ("2001:db8::1", "Zürich"),
        ("2001:db8:1::1", "Paris, Île-de-France"),
        ("2001:db8:1:2::1", "Paris 2"),
        ("2001:db8:1:3::1", "Paris, Île-de-France"),
        ("::ffff:192.0.2.200", "Las Vegas"),  # IPv4-mapped: looked up as IPv4
    ],
)
def test_longest_prefix_wins(index: GeofeedIndex, address: str, city: str) -> None:
    entry = index.lookup(address)
    assert entry is not None
    assert entry.city == city


def test_no_match(index: GeofeedIndex) -> None:
    assert index.lookup("2001:db9::1") is None  # no IPv6 default route in the feed
    assert GeofeedIndex().lookup("192.0.2.1") is None


def test_lookup_takes_address_objects(index: GeofeedIndex) -> None:
    assert index.lookup(IPv4Address("192.0.2.130")) == ENTRIES[1]
    assert index.lookup(IPv6Address("2001:db8::5")) == ENTRIES[3]


def test_lookup_rejects_garbage(index: GeofeedIndex) -> None:
    with pytest.raises(ValueError):
        index.lookup("not an address")


def test_index_size_iteration_and_duplicates() -> None:
    index = GeofeedIndex.from_text(format_geofeed(ENTRIES))
    assert len(index) == len(ENTRIES)
    assert sorted(index, key=str) == sorted(ENTRIES, key=str)
    with pytest.raises(ValueError, match="listed twice"):
        GeofeedIndex([ENTRIES[0], ENTRIES[0]])


def test_index_probes_lengths_longest_first() -> None:
    entries = [
        GeofeedEntry(ip_network(f"10.0.0.0/{length}"), "US", "", f"len{length}")
        for length in (8, 16, 24, 32)
    ]
    index = GeofeedIndex(reversed(entries))
    assert index.lookup("10.0.0.0") == entries[3]
    assert index.lookup("10.0.0.1") == entries[2]
    assert index.lookup("10.0.1.1") == entries[1]
    assert index.lookup("10.1.1.1") == entries[0]
    assert index.lookup("11.0.0.0") is None
