"""The pure parts of the client: verify's judgement per family, the MASQUE target paths
and credentials, the PAC file, and the enrollment file (0600, secret kept out of repr)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from egressd.client.local_proxy import pac_file
from egressd.client.state import ClientStateError, Enrollment, PopEndpoint
from egressd.client.verify import Observation, judge, parse_trace, summary, trace_body
from egressd.protocols.masque import (
    PROTOCOL_TCP,
    PROTOCOL_UDP,
    basic_authorization,
    parse_basic,
    parse_target,
    target_path,
)


def device(**changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "account_id": "acme", "plan": "enterprise",
        "network": {"proxy_tcp": True, "proxy_udp": False, "fallback": "closed"},
        "dedicated": {"status": "active", "detail": "active in Los Angeles, New York"},
        "locations": [
            {"id": "lax", "pop": "lax", "city": "Los Angeles", "ipv4": "198.51.100.61",
             "ipv6": "2001:db8:201::/48", "state": "active"},
            {"id": "jfk", "pop": "jfk", "city": "New York", "ipv4": "198.51.100.62",
             "ipv6": "2001:db8:202::/48", "state": "active"},
        ],
        "pops": [{"code": "las", "city": "Las Vegas", "shared": ["203.0.113.10", "2001:db8:10::/48"]},
                 {"code": "lax", "city": "Los Angeles", "shared": ["203.0.113.20"]}],
    }
    view.update(changes)
    return view


def test_dedicated_ipv4_from_its_home_pop_matches() -> None:
    result = judge(Observation(4, "las", "lax", "198.51.100.61", "Los Angeles"), device())
    assert result.ok and result.message == (
        "IPv4 left from dedicated address 198.51.100.61 (location lax, Los Angeles)")


def test_dedicated_ipv4_from_the_wrong_pop_is_a_mismatch() -> None:
    result = judge(Observation(4, "las", "las", "198.51.100.61"), device())
    assert not result.ok and "R7: it lives at lax" in result.message


def test_ipv6_inside_a_location_range_matches_and_leaves_locally() -> None:
    result = judge(Observation(6, "las", None, "2001:db8:201:1::5"), device())
    assert result.ok and result.egress_pop == "las" and "location lax" in result.message


def test_shared_address_messages_say_why() -> None:
    tcp_off = device(network={"proxy_tcp": False, "proxy_udp": False, "fallback": "closed"})
    assert judge(Observation(6, "las", None, "2001:db8:10::7"), tcp_off).message == (
        "IPv6 left from a shared address: proxy.tcp is off for this account")
    free = device(plan="free", locations=[], dedicated={"status": "none", "detail": "no dedicated locations"})
    assert judge(Observation(4, "las", None, "203.0.113.10"), free).message == (
        "IPv4 left from a shared address: the account has no dedicated egress (plan free)")
    policy = judge(Observation(4, "las", None, "203.0.113.10"), device())
    assert not policy.ok and "action shared" in policy.message and policy.egress_pop == "las"
    one_city = device(dedicated={"status": "needs-second-city", "detail": "inactive: needs two"})
    assert "its dedicated egress is not active: inactive: needs two" in judge(
        Observation(4, "las", None, "203.0.113.10"), one_city).message


def test_no_path_and_foreign_addresses() -> None:
    assert judge(Observation(6, "las", error="no IPv6 echo is known"), device()).message == (
        "missing IPv6 path: no IPv6 echo is known")
    assert judge(Observation(6, "las", None, "198.51.100.61"), device()).message.startswith(
        "missing IPv6 path: the IPv6 echo saw the flow arrive over IPv4")
    stranger = judge(Observation(4, "las", None, "192.0.2.99"), device())
    assert not stranger.ok and "neither a dedicated address" in stranger.message
    assert not summary([]) and not summary([stranger])


def test_trace_parsing() -> None:
    assert parse_trace("ip=1.2.3.4\nfamily=4\ncity=Los Angeles\nnoise\n") == {
        "ip": "1.2.3.4", "family": "4", "city": "Los Angeles"}
    assert trace_body(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nip=1.2.3.4\n") == "ip=1.2.3.4\n"
    with pytest.raises(ValueError, match="502"):
        trace_body(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")


@pytest.mark.parametrize(("host", "port"), [("echo.example", 80), ("2001:db8::1", 443),
                                            ("192.0.2.1", 65535)])
def test_masque_paths_round_trip(host: str, port: int) -> None:
    for protocol in (PROTOCOL_TCP, PROTOCOL_UDP):
        assert parse_target(protocol, target_path(protocol, host, port)) == (host, port)
    assert "%3A" in target_path(PROTOCOL_TCP, "2001:db8::1", 1)


@pytest.mark.parametrize("path", ["/", "/.well-known/masque/tcp/a/0/", "/.well-known/masque/tcp/a/080/",
                                  "/.well-known/masque/tcp/a/65536/", "/.well-known/masque/tcp//80/",
                                  "/.well-known/masque/tcp/a b/80/", "/.well-known/masque/udp/a/80/",
                                  "/.well-known/masque/tcp/a/80", "/.well-known/masque/tcp/%00/80/"])
def test_masque_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        parse_target(PROTOCOL_TCP, path)


def test_basic_credentials() -> None:
    assert parse_basic(basic_authorization("dev-1", "s3:cret")) == ("dev-1", "s3:cret")
    for bad in (None, "", "Bearer x", "Basic", "Basic !!!", "Basic " + "eA==", "Basic OnNlY3JldA=="):
        assert parse_basic(bad) is None


def test_pac_file_sends_everything_but_local_names_to_the_proxy() -> None:
    pac = pac_file("127.0.0.1", 40000)
    assert 'return "PROXY 127.0.0.1:40000; SOCKS5 127.0.0.1:40000";' in pac
    assert pac.count("DIRECT") == 1


def test_enrollment_file_is_private_and_the_secret_stays_out_of_repr(tmp_path: Path) -> None:
    enrollment = Enrollment(control="http://c", device_id="acme-alice-1", secret="hush-123",
                            account_id="acme", user="alice",
                            pops=(PopEndpoint("las", "Las Vegas", "::1", 443),))
    path = enrollment.save(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Enrollment.load(tmp_path / "state") == enrollment
    assert "hush-123" not in repr(enrollment) and enrollment.pops[0].address == "[::1]:443"
    path.write_text("{}")
    with pytest.raises(ClientStateError, match="not an enrollment file"):
        Enrollment.load(tmp_path / "state")


def test_the_client_moves_only_to_a_clearly_faster_pop() -> None:
    from egressd.client.attach import should_move

    assert should_move(50.0, 10.0)
    assert not should_move(50.0, 40.0)  # not 30 % faster
    assert not should_move(2.0, 0.5)  # 75 % faster but not 2 ms: loopback noise
    assert not should_move(10.0, 10.0)


def test_debug_logging_keeps_hpack_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    """hpack logs every header at DEBUG, a device link's proxy-authorization among them."""
    import logging

    import hpack

    from egressd.cli.runner import setup_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        setup_logging("debug")
        header = basic_authorization("dev", "s3cret")
        hpack.Decoder().decode(hpack.Encoder().encode([("proxy-authorization", header)]))
        logging.getLogger("egressd.test").debug("debug is on")
        err = capsys.readouterr().err
        assert "debug is on" in err and header not in err and header.split()[1] not in err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.getLogger("hpack").setLevel(logging.NOTSET)
