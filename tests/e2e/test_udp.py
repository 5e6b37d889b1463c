"""R3 over SOCKS5 UDP ASSOCIATE: UDP (and HTTP/3 over it) uses dedicated egress only when
the account's proxy.udp is on; otherwise the connected PoP's shared address."""

from __future__ import annotations

import time
from typing import Any

import pytest

from egressd.pop.runtime import PopOptions

from .helpers import (
    by_source,
    credentials,
    h3_get,
    host_port,
    pop_plain,
    read_all,
    socks5_udp,
    wait_flow,
)

ACME_LAX = "127.0.2.100"
PROXY_UDP = [
    pytest.param({"acme_proxy_udp": False}, id="proxy_udp-off"),
    pytest.param({"acme_proxy_udp": True}, id="proxy_udp-on"),
]


def expected_source(info: dict[str, Any]) -> tuple[set[str], str, str]:
    """(addresses, egress PoP, rule) acme's UDP flows through las must leave with."""
    if info["accounts"]["acme"]["proxy_udp"]:
        return {ACME_LAX}, "lax", "R6"
    return set(info["pops"]["las"]["shared_ipv4"]), "las", "R3"


@pytest.mark.parametrize("serve", PROXY_UDP, indirect=True)
async def test_udp_flow_of_acme_follows_proxy_udp(serve: dict[str, Any]) -> None:
    addresses, egress_pop, rule = expected_source(serve)
    echo = host_port(serve["echo"]["udp"])
    async with socks5_udp(pop_plain(serve), credentials(serve, "acme")) as udp:
        udp.send(*echo, b"hello")
        source_host, source_port, payload = await udp.recv()
    assert (source_host, source_port) == echo  # the reply names the echo as its source
    seen_ip, seen_port = payload.decode().split()
    assert seen_ip in addresses
    flow = await wait_flow(serve["flow_log"], by_source(f"{seen_ip}:{seen_port}"))
    assert flow["protocol"] == "udp" and flow["account"] == "acme"
    assert (flow["connected_pop"], flow["egress_pop"], flow["rule"]) == ("las", egress_pop, rule)
    assert flow["outcome"] == "ok" and flow["closed_by"] == "client"
    assert flow["bytes_up"] == len(b"hello") and flow["bytes_down"] == len(payload)


async def test_udp_flow_of_globex_leaves_from_a_shared_address(serve: dict[str, Any]) -> None:
    echo = host_port(serve["echo"]["udp"])
    async with socks5_udp(pop_plain(serve), credentials(serve, "globex")) as udp:
        udp.send(*echo, b"hello")
        _host, _port, payload = await udp.recv()
    assert payload.decode().split()[0] in serve["pops"]["las"]["shared_ipv4"]


async def test_udp_association_answers_several_datagrams_from_one_source(serve: dict[str, Any]) -> None:
    """One association, one upstream socket per source address: every reply shows the same
    address and port, and the flow log has one line for the destination."""
    echo = host_port(serve["echo"]["udp"])
    replies = set()
    async with socks5_udp(pop_plain(serve), credentials(serve, "acme")) as udp:
        for index in range(5):
            udp.send(*echo, f"ping {index}".encode())
            replies.add((await udp.recv())[2])
    assert len(replies) == 1
    seen = replies.pop().decode().split()
    assert seen[0] == ACME_LAX
    flow = await wait_flow(serve["flow_log"], by_source(f"{seen[0]}:{seen[1]}"))
    assert flow["bytes_up"] == sum(len(f"ping {index}") for index in range(5))


@pytest.mark.parametrize("serve", PROXY_UDP, indirect=True)
async def test_http3_over_socks5_udp_follows_proxy_udp(serve: dict[str, Any]) -> None:
    """aioquic's sans-I/O QUIC + H3 connection, every datagram through the SOCKS5 relay."""
    addresses, egress_pop, rule = expected_source(serve)
    target = host_port(serve["echo"]["h3"])
    async with socks5_udp(pop_plain(serve), credentials(serve, "acme")) as udp:
        # The echo's certificate names echo.egressd.test and IP 127.0.9.1 (serve.py).
        status, body = await h3_get(udp, target, "/", cafile=serve["ca_cert"], server_name=target[0])
        assert status == 200
        assert body.decode().strip() in addresses
        status, trace = await h3_get(udp, target, "/trace", cafile=serve["ca_cert"],
                                     server_name="echo.egressd.test")
        assert status == 200
    fields = dict(line.split("=", 1) for line in trace.decode().splitlines())
    assert fields["http"] == "3" and fields["ip"] in addresses
    flow = await wait_flow(serve["flow_log"], by_source(f"{fields['ip']}:{fields['port']}"))
    assert flow["protocol"] == "udp" and flow["port"] == target[1]
    assert (flow["connected_pop"], flow["egress_pop"], flow["rule"]) == ("las", egress_pop, rule)


async def test_udp_to_a_hostname_is_resolved_by_the_pop(serve: dict[str, Any]) -> None:
    _host, port = host_port(serve["echo"]["udp"])
    async with socks5_udp(pop_plain(serve), credentials(serve, "acme")) as udp:
        udp.send("echo.egressd.test", port, b"by name")
        source_host, source_port, payload = await udp.recv()
    assert (source_host, source_port) == ("127.0.9.1", port)
    seen_ip, seen_port = payload.decode().split()
    assert seen_ip == ACME_LAX
    flow = await wait_flow(serve["flow_log"], by_source(f"{seen_ip}:{seen_port}"))
    assert flow["hostname"] == "echo.egressd.test" and flow["destination"] == "127.0.9.1"


@pytest.mark.parametrize("serve", [pytest.param({"options": PopOptions(udp_idle_timeout=1.0)}, id="udp-idle-1s")],
                         indirect=True)
async def test_idle_udp_association_is_closed_with_its_control_connection(serve: dict[str, Any]) -> None:
    echo = host_port(serve["echo"]["udp"])
    async with socks5_udp(pop_plain(serve), credentials(serve, "acme")) as udp:
        udp.send(*echo, b"once")
        seen_ip, seen_port = (await udp.recv())[2].decode().split()
        started = time.monotonic()
        assert await read_all(udp.reader) == b""  # the PoP ends the association
        assert time.monotonic() - started < 5.0
    flow = await wait_flow(serve["flow_log"], by_source(f"{seen_ip}:{seen_port}"))
    assert flow["closed_by"] == "idle-timeout"
