"""The PoP's DNS resolver (issue 6 item 1) with a real `egressd pop` on loopback: port 53
service over UDP and TCP, DoH with curl and httpx, the PoP's own lookups for proxied flows,
all through one cache and asked upstream from the PoP's shared address (R4), each query a
`dns` flow; malformed, oversized and unauthorised queries get a clear answer or none."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import httpx
import pytest
from tests.e2e.helpers import udp_and_tcp_on_one_port

from egressd.echo.server import EchoServer
from egressd.lab.dns_server import DnsServer, Zone, _Udp
from egressd.pki import ensure_ca, ensure_server_cert

from .processes import DEVICE, SECRET, PopUnderTest, Start, start_pop

pytestmark = pytest.mark.slow

SHARED = "127.0.0.2"  # the test PoP's shared address: every upstream query must come from it
NAME = "echo.lab.egressd.test"


@dataclass
class World:
    pop: PopUnderTest
    dns_port: int
    https: tuple[str, int]
    upstream_log: io.StringIO
    echo_port: int
    ca: Path

    def upstream_queries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.upstream_log.getvalue().splitlines()]

    def flows(self) -> list[dict[str, Any]]:
        if not self.pop.flow_log.exists():
            return []
        return [json.loads(line) for line in self.pop.flow_log.read_text().splitlines() if line.strip()]


def free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


async def make_world(egressd_process: Start, tmp_path: Path, *extra: str) -> AsyncIterator[World]:
    echo = EchoServer()
    await echo.start("127.0.0.1", http_port=0, udp_port=None)
    assert echo.http_port is not None
    zone = Zone("lab.egressd.test", {NAME: ["127.0.0.1"], "*.echo.lab.egressd.test": ["127.0.0.1"]})
    upstream_log = io.StringIO()
    server = DnsServer(zone, upstream_log)
    transport, tcp, upstream_port = await udp_and_tcp_on_one_port(lambda: _Udp(server), server.tcp)
    pki = tmp_path / "pki"
    cert = ensure_server_cert(pki, "pop", ["localhost"], ["127.0.0.1"], ensure_ca(pki))
    dns_port = free_udp_tcp_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        https_port = probe.getsockname()[1]
    try:
        pop = await start_pop(egressd_process, tmp_path, "--dns-upstream", f"127.0.0.1:{upstream_port}",
                              "--dns-listen", f"127.0.0.1:{dns_port}",
                              "--https-listen", f"127.0.0.1:{https_port}", "--cert", str(cert.cert_path),
                              "--key", str(cert.key_path), "--host", "unused.test=127.0.0.1", *extra)
        yield World(pop, dns_port, ("127.0.0.1", https_port), upstream_log, echo.http_port, cert.ca_cert_path)
    finally:
        transport.close()
        tcp.close()
        await echo.close()


@pytest.fixture
async def world(egressd_process: Start, tmp_path: Path) -> AsyncIterator[World]:
    async for made in make_world(egressd_process, tmp_path):
        yield made


async def ask(world: World, name: str, kind: str = "A", *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, kind)
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=world.dns_port, timeout=5)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=world.dns_port, timeout=5)


async def test_a_query_is_answered_from_upstream_asked_from_the_shared_address(world: World) -> None:
    answer = await ask(world, NAME)
    assert answer.rcode() == dns.rcode.NOERROR and answer.flags & dns.flags.RA
    assert [rdata.to_text() for rdata in answer.answer[0]] == ["127.0.0.1"]
    asked = world.upstream_queries()
    assert {entry["source"] for entry in asked} == {SHARED}  # R4: never a dedicated address
    flows = [flow for flow in world.flows() if flow["protocol"] == "dns"]
    assert flows and flows[-1]["rule"] == "R4" and flows[-1]["hostname"] == NAME
    assert flows[-1]["source"] == SHARED and flows[-1]["outcome"] == "ok"


async def test_answers_are_cached_for_their_ttl_and_shared_by_udp_and_tcp(world: World) -> None:
    first = await ask(world, NAME)
    asked = len(world.upstream_queries())
    second = await ask(world, NAME, tcp=True)
    assert [r.to_text() for r in second.answer[0]] == [r.to_text() for r in first.answer[0]]
    assert len(world.upstream_queries()) == asked  # from the cache
    assert second.answer[0].ttl <= first.answer[0].ttl
    missing = await ask(world, "nothing.lab.egressd.test")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    count = len(world.upstream_queries())
    assert (await ask(world, "nothing.lab.egressd.test")).rcode() == dns.rcode.NXDOMAIN
    assert len(world.upstream_queries()) == count  # negative answers are cached too
    aaaa = await ask(world, NAME, "AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer  # the zone has no IPv6 here


async def test_concurrent_identical_questions_share_one_upstream_query(world: World) -> None:
    answers = await asyncio.gather(*(ask(world, "burst.echo.lab.egressd.test") for _ in range(20)))
    assert all(a.rcode() == dns.rcode.NOERROR for a in answers)
    asked = [e for e in world.upstream_queries() if e["name"] == "burst.echo.lab.egressd.test."]
    assert len(asked) == 1


async def test_the_pops_own_lookups_use_the_same_resolver(world: World) -> None:
    """A proxied flow to a name: resolved through the service, from the shared address."""
    proxy = f"http://{DEVICE}:{SECRET}@{world.pop.address[0]}:{world.pop.address[1]}"
    async with httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=10) as client:
        response = await client.get(f"http://flow.echo.lab.egressd.test:{world.echo_port}/")
    assert response.status_code == 200 and response.text.strip() == SHARED
    asked = [e for e in world.upstream_queries() if e["name"] == "flow.echo.lab.egressd.test."]
    assert {e["type"] for e in asked} == {"A", "AAAA"} and {e["source"] for e in asked} == {SHARED}
    cached = await ask(world, "flow.echo.lab.egressd.test")  # a device now gets the cached answer
    assert cached.answer and len(world.upstream_queries()) == len(asked) + sum(
        1 for e in world.upstream_queries() if e["name"] != "flow.echo.lab.egressd.test.")


async def udp_exchange(port: int, payload: bytes, wait: float = 1.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, payload)
        try:
            async with asyncio.timeout(wait):
                return await loop.sock_recv(sock, 65535)
        except TimeoutError:
            return None


async def test_malformed_and_oversized_queries_get_formerr_or_nothing(world: World) -> None:
    garbage = struct.pack("!HH", 0x4242, 0x0100) + b"\xff" * 30
    reply = await udp_exchange(world.dns_port, garbage)
    assert reply is not None and reply[:2] == b"\x42\x42" and reply[3] & 0x0F == dns.rcode.FORMERR
    assert await udp_exchange(world.dns_port, b"\x01\x02\x03", wait=0.5) is None  # no header: dropped
    response = dns.message.make_response(dns.message.make_query(NAME, "A")).to_wire()
    assert await udp_exchange(world.dns_port, response, wait=0.5) is None  # never answer a response
    big = dns.message.make_query(NAME, "A").to_wire() + b"\0" * 5000
    reply = await udp_exchange(world.dns_port, big)
    assert reply is not None and reply[3] & 0x0F == dns.rcode.FORMERR
    reader, writer = await asyncio.open_connection("127.0.0.1", world.dns_port)
    writer.write(struct.pack("!H", 60000) + b"\0" * 100)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
    writer.close()
    errors = [f for f in world.flows() if f["protocol"] == "dns" and f["outcome"] == "protocol-error"]
    assert any("oversized" in (f["error"] or "") for f in errors)
    assert any("malformed" in (f["error"] or "") for f in errors)
    assert (await ask(world, NAME)).rcode() == dns.rcode.NOERROR  # still serving


def doh_get_url(world: World, name: str) -> str:
    wire = dns.message.make_query(name, "A").to_wire()
    encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
    return f"https://127.0.0.1:{world.https[1]}/dns-query?dns={encoded}"


async def test_doh_get_and_post_with_a_device_credential(world: World) -> None:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(world.ca)), trust_env=False, timeout=10,
                                 auth=(DEVICE, SECRET)) as client:
        got = await client.get(doh_get_url(world, "doh.echo.lab.egressd.test"))
        posted = await client.post(f"https://127.0.0.1:{world.https[1]}/dns-query",
                                   content=dns.message.make_query(NAME, "A").to_wire(),
                                   headers={"content-type": "application/dns-message"})
        wrong_type = await client.post(f"https://127.0.0.1:{world.https[1]}/dns-query", content=b"x",
                                       headers={"content-type": "text/plain"})
        not_dns = await client.get(f"https://127.0.0.1:{world.https[1]}/dns-query?dns=AAAA")
    for response in (got, posted):
        assert response.status_code == 200 and response.headers["content-type"] == "application/dns-message"
        message = dns.message.from_wire(response.content)
        assert [r.to_text() for r in message.answer[0]] == ["127.0.0.1"]
    assert wrong_type.status_code == 415 and not_dns.status_code == 400
    doh = [f for f in world.flows() if f["protocol"] == "dns" and f["account"] == "tester"]
    assert [f["outcome"] for f in doh] == ["ok", "ok", "protocol-error"]
    assert all(f["rule"] == "R4" and f["device"] == DEVICE for f in doh[:2])


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_resolves_through_doh(world: World) -> None:
    url = f"https://{DEVICE}:{SECRET}@127.0.0.1:{world.https[1]}/dns-query"
    result = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--max-time", "10", "--doh-url", url, "--doh-insecure", "--noproxy", "*",
        f"http://curl.echo.lab.egressd.test:{world.echo_port}/"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "127.0.0.1", result.stderr
    asked = [e for e in world.upstream_queries() if e["name"] == "curl.echo.lab.egressd.test."]
    assert asked and {e["source"] for e in asked} == {SHARED}


@pytest.fixture
async def strict_world(egressd_process: Start, tmp_path: Path) -> AsyncIterator[World]:
    async for made in make_world(egressd_process, tmp_path, "--dns-allow", "192.0.2.0/24"):
        yield made


async def test_sources_outside_dns_allow_are_refused_and_doh_needs_a_credential(strict_world: World) -> None:
    world = strict_world
    refused = await ask(world, NAME)
    assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
    assert world.upstream_queries() == []  # nothing was asked for it
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(world.ca)), trust_env=False, timeout=10) as client:
        anonymous = await client.get(doh_get_url(world, NAME))
        wrong = await client.get(doh_get_url(world, NAME), auth=(DEVICE, "not-the-secret"))
        right = await client.get(doh_get_url(world, NAME), auth=(DEVICE, SECRET))
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["www-authenticate"]
    assert wrong.status_code == 401 and right.status_code == 200
    flows = [f for f in world.flows() if f["protocol"] == "dns"]
    assert any(f["outcome"] == "refused" and "--dns-allow" in (f["error"] or "") for f in flows)
    assert SECRET not in world.pop.child.stderr() and SECRET not in world.pop.flow_log.read_text()
