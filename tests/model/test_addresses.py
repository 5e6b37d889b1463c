"""Address helpers (`model/addresses.py`): the remembered text and literal parses."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from egressd.model import addresses
from egressd.model.addresses import address_literal, address_text


@given(st.ip_addresses())
def test_address_text_is_str_for_every_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert address_text(address) == str(address)
    assert address_text(address) == str(address)  # remembered, same answer
    copy = ipaddress.ip_address(str(address))  # an equal object that is not the same
    assert address_text(copy) == str(address)


def test_address_text_is_bounded_and_never_answers_for_a_reused_identity() -> None:
    for n in range(addresses._TEXTS_KEPT + 10):
        address = ipaddress.IPv4Address(n)
        # Each address dies after this iteration, so its id() is reused by the next ones:
        # the entry's identity check must refuse the stale text.
        assert address_text(address) == str(address)
    assert len(addresses._TEXTS) <= addresses._TEXTS_KEPT


def test_address_literal_parses_literals_only() -> None:
    assert address_literal("127.0.0.1") == ipaddress.IPv4Address("127.0.0.1")
    assert address_literal("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert address_literal("example.com") is None
    assert address_literal("127.000.0.1") is None
