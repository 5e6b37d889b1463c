"""R1, R6, R7 through every device protocol: which source address the echo origin sees.

acme (enterprise, dedicated egress in lax and jfk) attached to las leaves from its lax
address 127.0.2.100, the lowest backbone RTT from Las Vegas, over the backbone; globex
(free) leaves from one of las's shared addresses. The flow log says so, line by line.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from python_socks.async_.asyncio import Proxy

from .helpers import (
    IO_TIMEOUT,
    by_source,
    close_writer,
    credentials,
    curl,
    host_port,
    parse_trace,
    read_all,
    read_flows,
    settle,
    wait_flow,
)

ACME_LAX = "127.0.2.100"
ACME_JFK = "127.0.3.100"


def echo_name_url(info: dict[str, Any], path: str = "trace") -> str:
    return info["echo"]["name"] + path


async def via_curl_http(info: dict[str, Any], account: str) -> str:
    result = await curl("-K", info["accounts"][account]["curlrc"],
                        "-x", info["pops"]["las"]["http_proxy"], info["echo"]["trace"])
    assert result.statuses == [200], result
    return result.body.decode()


async def via_curl_https_proxy(info: dict[str, Any], account: str) -> str:
    result = await curl("-K", info["accounts"][account]["curlrc"],
                        "--proxy", info["pops"]["las"]["https_proxy"], "--proxy-cacert", info["ca_cert"],
                        echo_name_url(info))
    assert result.statuses == [200], result
    return result.body.decode()


async def via_curl_connect(info: dict[str, Any], account: str) -> str:
    result = await curl("-K", info["accounts"][account]["curlrc"], "-p",
                        "-x", info["pops"]["las"]["http_proxy"], echo_name_url(info))
    assert result.statuses == [200, 200], result
    return result.body.decode()


async def via_curl_https_proxy_connect(info: dict[str, Any], account: str) -> str:
    result = await curl("-K", info["accounts"][account]["curlrc"], "-p",
                        "--proxy", info["pops"]["las"]["https_proxy"], "--proxy-cacert", info["ca_cert"],
                        echo_name_url(info))
    assert result.statuses == [200, 200], result
    return result.body.decode()


async def via_curl_socks5_hostname(info: dict[str, Any], account: str) -> str:
    host, port = host_port(info["pops"]["las"]["socks5"])
    result = await curl("-K", info["accounts"][account]["curlrc"],
                        "--socks5-hostname", f"{host}:{port}", echo_name_url(info))
    assert result.statuses == [200], result
    return result.body.decode()


async def via_python_socks(info: dict[str, Any], account: str) -> str:
    user, password = credentials(info, account)
    host, port = host_port(info["pops"]["las"]["socks5"])
    proxy = Proxy.from_url(f"socks5://{user}:{password}@{host}:{port}", rdns=True)
    echo_host, echo_port = host_port(info["echo"]["name"])
    sock = await proxy.connect(dest_host=echo_host, dest_port=echo_port, timeout=IO_TIMEOUT)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET /trace HTTP/1.1\r\nHost: {echo_host}\r\nConnection: close\r\n\r\n".encode())
        response = await read_all(reader)
    finally:
        await close_writer(writer)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    return body.decode()


CLIENTS = {
    "curl-http-proxy": (via_curl_http, False),
    "curl-https-proxy": (via_curl_https_proxy, True),
    "curl-connect": (via_curl_connect, True),
    "curl-https-proxy-connect": (via_curl_https_proxy_connect, True),
    "curl-socks5-hostname": (via_curl_socks5_hostname, True),
    "python-socks": (via_python_socks, True),
}


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_acme_through_las_leaves_from_its_lax_address_over_the_backbone(
    serve: dict[str, Any], client: str,
) -> None:
    fetch, by_name = CLIENTS[client]
    trace = parse_trace((await fetch(serve, "acme")).encode())
    assert trace["ip"] == ACME_LAX  # R6: lax is the closest dedicated location to las
    flow = await wait_flow(serve["flow_log"], by_source(f"{ACME_LAX}:{trace['port']}"))
    assert flow["account"] == "acme" and flow["user"] == "alice" and flow["device"] == "acme-laptop"
    assert flow["protocol"] == "tcp"
    assert flow["connected_pop"] == "las"
    assert flow["egress_pop"] == "lax"  # R7: connected and egress PoP differ, both visible
    assert flow["path"] == "backbone"
    assert flow["rule"] == "R6"
    assert flow["egress"] == "dedicated"
    assert flow["logical_location"] == "Los Angeles"
    assert flow["outcome"] == "ok"
    assert flow["destination"] == "127.0.9.1"
    assert flow["hostname"] == ("echo.egressd.test" if by_name else None)


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_globex_through_las_leaves_from_a_shared_las_address(
    serve: dict[str, Any], client: str,
) -> None:
    fetch, _by_name = CLIENTS[client]
    trace = parse_trace((await fetch(serve, "globex")).encode())
    shared = serve["pops"]["las"]["shared_ipv4"]
    assert trace["ip"] in shared  # R1
    flow = await wait_flow(serve["flow_log"], by_source(f"{trace['ip']}:{trace['port']}"))
    assert flow["account"] == "globex"
    assert (flow["connected_pop"], flow["egress_pop"], flow["path"]) == ("las", "las", "direct")
    assert flow["rule"] == "R1" and flow["egress"] == "shared"
    assert flow["outcome"] == "ok"


@pytest.mark.parametrize(("pop", "account", "source", "egress_pop", "path", "rule"), [
    ("lax", "acme", ACME_LAX, "lax", "direct", "R6"),
    ("jfk", "acme", ACME_JFK, "jfk", "direct", "R6"),
    ("lax", "globex", "127.0.2.1", "lax", "direct", "R1"),
    ("jfk", "globex", "127.0.3.1", "jfk", "direct", "R1"),
])
async def test_each_pop_picks_its_own_best_egress(
    serve: dict[str, Any], pop: str, account: str, source: str, egress_pop: str, path: str, rule: str,
) -> None:
    """R6: a dedicated location at the connected PoP itself is the most performant."""
    result = await curl("-K", serve["accounts"][account]["curlrc"],
                        "-x", serve["pops"][pop]["http_proxy"], serve["echo"]["trace"])
    assert result.statuses == [200], result
    trace = parse_trace(result.body)
    assert trace["ip"] == source
    flow = await wait_flow(serve["flow_log"], by_source(f"{source}:{trace['port']}"))
    assert (flow["connected_pop"], flow["egress_pop"], flow["path"], flow["rule"]) == (pop, egress_pop, path, rule)


async def test_keep_alive_requests_on_one_proxy_connection_keep_the_dedicated_source(
    serve: dict[str, Any],
) -> None:
    """curl reuses one proxy connection for two URLs: both flows leave from 127.0.2.100,
    over one kept upstream connection, and both are in the flow log."""
    url = serve["echo"]["trace"]
    result = await curl("-K", serve["accounts"]["acme"]["curlrc"],
                        "-x", serve["pops"]["las"]["http_proxy"], url, url, heads=False)
    assert result.returncode == 0, result
    traces = [parse_trace(b"ip=" + part) for part in result.body.split(b"ip=")[1:]]
    assert len(traces) == 2, result.body
    assert {trace["ip"] for trace in traces} == {ACME_LAX}
    assert traces[0]["port"] == traces[1]["port"]  # one upstream connection, kept
    source = f"{ACME_LAX}:{traces[0]['port']}"

    def flows() -> list[dict[str, Any]]:
        return [flow for flow in read_flows(serve["flow_log"]) if flow["source"] == source]

    assert await settle(lambda: len(flows()) == 2), read_flows(serve["flow_log"])
    assert all(flow["egress_pop"] == "lax" and flow["rule"] == "R6" for flow in flows())
