"""R13 isolation: nothing is proxied without valid credentials of the device's own account,
and a PoP never reaches loopback, link-local, its own or any egress address (no SSRF)."""

from __future__ import annotations

import json
import ssl
from typing import Any

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from .helpers import (
    IO_TIMEOUT,
    basic,
    by_client_port,
    close_writer,
    credentials,
    curl,
    host_port,
    http_connect,
    http_get,
    local_port,
    open_tcp,
    parse_trace,
    pop_plain,
    read_all,
    read_flows,
    read_response,
    settle,
    socks5_login,
    socks5_request,
    socks5_udp,
    wait_flow,
)

WRONG = "not-the-secret-x9"


def auth_cases(info: dict[str, Any]) -> dict[str, tuple[str, str] | None]:
    acme_user, acme_password = credentials(info, "acme")
    globex_user, _ = credentials(info, "globex")
    return {
        "none": None,
        "wrong-password": (acme_user, WRONG),
        "unknown-device": ("nobody-laptop", acme_password),
        "other-accounts-device": (globex_user, acme_password),
        "empty-password": (acme_user, ""),
    }


AUTH_CASES = ["none", "wrong-password", "unknown-device", "other-accounts-device", "empty-password"]


@pytest.mark.parametrize("case", AUTH_CASES)
async def test_absolute_form_without_valid_credentials_is_407(serve: dict[str, Any], case: str) -> None:
    auth = auth_cases(serve)[case]
    response, port = await http_get(pop_plain(serve), serve["echo"]["http"], auth)
    assert response.status == 407
    assert response.headers["proxy-authenticate"].lower().startswith("basic")
    flow = await wait_flow(serve["flow_log"], by_client_port(port))
    assert flow["outcome"] == "auth-failed" and flow["source"] is None and flow["account"] is None


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("case", AUTH_CASES)
async def test_connect_without_valid_credentials_is_407(
    serve: dict[str, Any], case: str, tls: bool,
) -> None:
    auth = auth_cases(serve)[case]
    context = ssl.create_default_context(cafile=serve["ca_cert"]) if tls else None
    proxy = host_port(serve["pops"]["las"]["https_proxy" if tls else "http_proxy"])
    response, _reader, writer = await http_connect(proxy, "127.0.9.1:80", auth, ssl_context=context)
    try:
        assert response.status == 407
        assert "proxy-authenticate" in response.headers
    finally:
        await close_writer(writer)


async def test_curl_without_credentials_gets_407(serve: dict[str, Any]) -> None:
    result = await curl("-x", serve["pops"]["las"]["http_proxy"], serve["echo"]["http"])
    assert result.status == 407
    assert result.headers["proxy-authenticate"] == 'Basic realm="egressd"'
    result = await curl("-U", f"acme-laptop:{WRONG}", "-x", serve["pops"]["las"]["http_proxy"],
                        serve["echo"]["http"])
    assert result.status == 407


async def test_secrets_never_reach_the_flow_log(serve: dict[str, Any]) -> None:
    _user, password = credentials(serve, "acme")
    for case in AUTH_CASES:
        await http_get(pop_plain(serve), serve["echo"]["http"], auth_cases(serve)[case])
    await http_get(pop_plain(serve), serve["echo"]["http"], credentials(serve, "acme"))
    assert await settle(lambda: len(read_flows(serve["flow_log"])) == len(AUTH_CASES) + 1)
    text = json.dumps(read_flows(serve["flow_log"]))
    assert password not in text and WRONG not in text


@pytest.mark.parametrize("case", ["wrong-password", "unknown-device", "other-accounts-device"])
async def test_socks5_wrong_credentials_fail_and_close(serve: dict[str, Any], case: str) -> None:
    auth = auth_cases(serve)[case]
    assert auth is not None
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        assert await socks5_login(reader, writer, *auth) == b"\x01\x01"  # RFC 1929 failure
        assert await read_all(reader) == b""  # and the connection is closed
    finally:
        await close_writer(writer)
    flow = await wait_flow(serve["flow_log"], by_client_port(local_port(writer)))
    assert flow["outcome"] == "auth-failed"


async def test_python_socks_with_a_wrong_password_raises(serve: dict[str, Any]) -> None:
    user, _ = credentials(serve, "acme")
    host, port = pop_plain(serve)
    proxy = Proxy.from_url(f"socks5://{user}:{WRONG}@{host}:{port}")
    echo_host, echo_port = host_port(serve["echo"]["http"])
    with pytest.raises(ProxyError):
        await proxy.connect(dest_host=echo_host, dest_port=echo_port, timeout=IO_TIMEOUT)


def ssrf_targets(info: dict[str, Any]) -> dict[str, tuple[str, int]]:
    pop_port = pop_plain(info)[1]
    echo_port = host_port(info["echo"]["http"])[1]
    return {
        "pop-listener": ("127.0.0.1", pop_port),
        "metadata": ("169.254.169.254", 80),
        "ipv6-loopback": ("::1", pop_port),
        "own-shared-address": ("127.0.1.1", 80),
        "other-pop-shared-address": ("127.0.2.1", 80),
        "own-dedicated-address": ("127.0.2.100", echo_port),
        "unspecified": ("0.0.0.0", pop_port),
        "ipv4-mapped-loopback": ("::ffff:127.0.0.1", pop_port),
        "localhost-by-name": ("localhost", pop_port),
    }


SSRF = ["pop-listener", "metadata", "ipv6-loopback", "own-shared-address", "other-pop-shared-address",
        "own-dedicated-address", "unspecified", "ipv4-mapped-loopback", "localhost-by-name"]


def authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("target", SSRF)
async def test_connect_to_forbidden_destination_is_403_r13(serve: dict[str, Any], target: str) -> None:
    host, port = ssrf_targets(serve)[target]
    response, _reader, writer = await http_connect(pop_plain(serve), authority(host, port),
                                                  credentials(serve, "acme"))
    try:
        assert response.status == 403
        assert response.headers["x-egressd-rule"] == "R13"
    finally:
        await close_writer(writer)
    flow = await wait_flow(serve["flow_log"], by_client_port(local_port(writer)))
    assert flow["outcome"] == "refused" and flow["rule"] == "R13" and flow["source"] is None


@pytest.mark.parametrize("target", SSRF)
async def test_get_to_forbidden_destination_is_403_r13(serve: dict[str, Any], target: str) -> None:
    host, port = ssrf_targets(serve)[target]
    response, client_port = await http_get(pop_plain(serve), f"http://{authority(host, port)}/",
                                           credentials(serve, "globex"))
    assert response.status == 403
    assert response.headers["x-egressd-rule"] == "R13"
    flow = await wait_flow(serve["flow_log"], by_client_port(client_port))
    assert flow["outcome"] == "refused" and flow["rule"] == "R13"


@pytest.mark.parametrize("target", SSRF)
async def test_socks5_connect_to_forbidden_destination_is_reply_2(serve: dict[str, Any], target: str) -> None:
    host, port = ssrf_targets(serve)[target]
    reader, writer = await open_tcp(pop_plain(serve))
    try:
        assert await socks5_login(reader, writer, *credentials(serve, "acme")) == b"\x01\x00"
        reply, _bound = await socks5_request(reader, writer, 1, host, port)
        assert reply == 0x02  # connection not allowed by ruleset
        assert await read_all(reader) == b""
    finally:
        await close_writer(writer)
    flow = await wait_flow(serve["flow_log"], by_client_port(local_port(writer)))
    assert flow["outcome"] == "refused" and flow["rule"] == "R13"


async def test_socks5_udp_to_forbidden_destination_is_dropped_and_logged(serve: dict[str, Any]) -> None:
    pop_host, pop_port = pop_plain(serve)
    echo = host_port(serve["echo"]["udp"])
    async with socks5_udp((pop_host, pop_port), credentials(serve, "acme")) as udp:
        udp.send("127.0.0.1", pop_port, b"nope")
        udp.send("169.254.169.254", 53, b"nope")
        with pytest.raises(TimeoutError):
            await udp.recv(within=0.5)
        udp.send(*echo, b"still fine")  # the association itself keeps working
        assert (await udp.recv())[2].split()[0] == b"127.0.2.100"
    flow = await wait_flow(serve["flow_log"], lambda f: f["protocol"] == "udp" and f["destination"] == "127.0.0.1")
    assert flow["outcome"] == "refused" and flow["rule"] == "R13" and flow["bytes_up"] == 0


async def test_unauthenticated_refusals_leave_the_echo_alone(serve: dict[str, Any]) -> None:
    """After 407s and 403s, the flow log holds no flow that reached an upstream."""
    await http_get(pop_plain(serve), serve["echo"]["http"], None)
    await http_get(pop_plain(serve), "http://127.0.0.1:1/", credentials(serve, "acme"))
    assert await settle(lambda: len(read_flows(serve["flow_log"])) == 2)
    flows = read_flows(serve["flow_log"])
    assert all(flow["source"] is None and flow["bytes_down"] == 0 for flow in flows)


async def test_one_client_connection_never_shares_an_upstream_across_accounts(serve: dict[str, Any]) -> None:
    """acme then globex on one keep-alive proxy connection: each request leaves from its own
    account's address (a kept upstream connection is keyed by account and source)."""
    reader, writer = await open_tcp(pop_plain(serve))
    answers = []
    try:
        for account in ("acme", "globex", "acme"):
            writer.write((f"GET {serve['echo']['trace']} HTTP/1.1\r\nHost: 127.0.9.1\r\n"
                          f"Proxy-Authorization: {basic(*credentials(serve, account))}\r\n\r\n").encode())
            answers.append(parse_trace((await read_response(reader)).body))
    finally:
        await close_writer(writer)
    assert answers[0]["ip"] == answers[2]["ip"] == "127.0.2.100"
    assert answers[1]["ip"] in serve["pops"]["las"]["shared_ipv4"]
