"""`egressd verify` against `egressd serve` (R12): a matching account, a shared-only
account, proxy.tcp off and a missing IPv6 path, each with its exact message and exit code,
through the running client and straight through a PoP."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .conftest import Enroll, Result, Spawn, admin, cli, start_client

MATCH_LAX = "ok: IPv4 left from dedicated address 127.0.2.100 (location lax, Los Angeles)"
MATCH_JFK = "ok: IPv4 left from dedicated address 127.0.3.100 (location jfk, New York)"
SHARED_ONLY = "IPv4 left from a shared address: the account has no dedicated egress (plan free)"
TCP_OFF = "IPv4 left from a shared address: proxy.tcp is off for this account"
NO_IPV6 = "missing IPv6 path: no IPv6 echo is known (give --echo6 URL)"


async def test_matching_account_through_the_client(serve: dict[str, Any], enroll: Enroll,
                                                   spawn: Spawn) -> None:
    state = await enroll("acme")
    _child, status = await start_client(spawn, state)
    connected = status["connected_pop"]
    result = await cli("verify", "--state-dir", str(state), "--family", "4")
    assert result.code == 0, result.out + result.err
    assert (MATCH_JFK if connected == "jfk" else MATCH_LAX) in result.out.splitlines()
    egress, source, city = (("jfk", "127.0.3.100", "New York") if connected == "jfk"
                            else ("lax", "127.0.2.100", "Los Angeles"))
    assert (f"IPv4  connected {connected}  egress {egress}  source {source}  "
            f"geolocation {city}  ok") in result.out


async def test_matching_account_straight_through_a_pop(serve: dict[str, Any], enroll: Enroll) -> None:
    state = await enroll("acme")
    result = await cli("verify", "--state-dir", str(state), "--pop", "las", "--family", "4", "--json")
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["ok"] is True and report["via"] == "pop las"
    [ipv4] = report["families"]
    assert ipv4 == {"family": 4, "ok": True, "message": MATCH_LAX.removeprefix("ok: "),
                    "connected_pop": "las", "egress_pop": "lax", "source": "127.0.2.100",
                    "city": "Los Angeles", "expected": ["127.0.3.100", "127.0.2.100"]}


async def test_shared_only_account(serve: dict[str, Any], enroll: Enroll) -> None:
    state = await enroll("globex")
    result = await cli("verify", "--state-dir", str(state), "--pop", "las", "--family", "4")
    assert result.code == 1
    assert result.out.splitlines()[-1] == SHARED_ONLY
    assert "IPv4  connected las  egress las  source 127.0.1." in result.out
    assert "MISMATCH" in result.out


async def test_proxy_tcp_off(serve: dict[str, Any], enroll: Enroll) -> None:
    state = await enroll("acme")
    async with admin(serve) as api:
        response = await api.patch("/v1/accounts/acme/settings/network",
                                   json={"proxy_tcp": False, "proxy_udp": False})
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 5  # R14: in force on every PoP within 2 s
    result: Result | None = None
    while time.monotonic() < deadline:
        result = await cli("verify", "--state-dir", str(state), "--pop", "las", "--family", "4")
        if result.code == 1:
            break
        await asyncio.sleep(0.2)
    assert result is not None and result.code == 1, result
    assert result.out.splitlines()[-1] == TCP_OFF
    assert "IPv4  connected las  egress las  source 127.0.1." in result.out


async def test_missing_ipv6_path(serve: dict[str, Any], enroll: Enroll) -> None:
    """`egressd serve` lives on loopback: no IPv6 echo, and ::1 is refused by the PoP (R13)."""
    state = await enroll("acme")
    result = await cli("verify", "--state-dir", str(state), "--pop", "las")
    assert result.code == 1
    assert result.out.splitlines()[-2:] == [MATCH_LAX, NO_IPV6]
    echo_port = serve["echo"]["http"].rsplit(":", 1)[1].strip("/")
    url = f"http://[::1]:{echo_port}/trace"
    refused = await cli("verify", "--state-dir", str(state), "--pop", "las", "--family", "6",
                        "--echo6", url, "--json")
    assert refused.code == 1
    [ipv6] = json.loads(refused.out)["families"]
    assert ipv6["message"] == (f"missing IPv6 path: the gateway refused {url}: "
                               "403 destination ::1 is the loopback address")
    assert ipv6["ok"] is False and ipv6["source"] is None


async def test_verify_needs_a_client_or_a_pop(serve: dict[str, Any], enroll: Enroll) -> None:
    state = await enroll("acme")
    result = await cli("verify", "--state-dir", str(state))
    assert result.code == 2
    assert "the client is not running (egressd client run), or go straight through a PoP " \
           "with --pop CODE" in result.err
    unknown = await cli("verify", "--state-dir", str(state), "--pop", "xyz")
    assert unknown.code == 2 and "unknown PoP 'xyz'" in unknown.err
