"""Tunnel connectors between real processes on loopback (issue 6 items 2-3): three
`egressd pop` with a backbone and a tunnel listener, one `egressd tunnel run` holding links
to the two nearest, a private origin on 127.0.50.7 that says which source it saw.

- acme's device reaches the private origin through any PoP (locally attached connector,
  or over the backbone to a PoP that has it); the origin sees the connector's address,
  never acme's dedicated ones nor a PoP's; the flow log says R4, path private-route.
- a hostname route is resolved by the connector, not the PoP.
- globex is refused (R13) with a clear reason.
- killing one of the connector's two PoPs keeps the origin reachable.
- a wrong token is refused; a route overlapping another account's is refused and logged.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from egressd.pki import ensure_ca, ensure_server_cert
from egressd.pop.identity import hash_secret
from egressd.protocols.tunnel import token_digest

from .helpers import (
    basic,
    close_writer,
    curl,
    read_flows,
    read_response,
    settle,
    socks5_udp,
    tcp_server,
    wait_flow,
)
from .processes import EgressdProcess, Start, wait_healthy
from .test_backbone import CITIES, free_port

pytestmark = pytest.mark.slow

POPS = {"las": "127.0.1", "lax": "127.0.2", "jfk": "127.0.3"}
SECRET = "tunnel-test-secret"
ACME_TOKEN = "egdt.acme-office.0123456789abcdef0123456789abcdef0123456789abcdef"
GLOBEX_TOKEN = "egdt.globex-office.fedcba9876543210fedcba9876543210fedcba9876543210"
ORIGIN = "127.0.50.7"
DEDICATED = {"127.0.2.100", "127.0.3.100"}


def deployment() -> str:
    parts = ['[deployment]\nallow_destinations = ["127.0.0.1/32", "127.0.50.0/24", '
             '"127.0.60.0/24"]\n']
    for slot, (code, net) in enumerate(POPS.items(), start=1):
        city, lat, lon = CITIES[code]
        parts.append(f'''
[[data_centers]]
code = "{code}"
city = "{city}"
country = "US"
latitude = {lat}
longitude = {lon}
shared_ipv4 = ["{net}.1"]
backbone = "{net}.254"
slot = {slot}
''')
    parts.append(f'''
[[accounts]]
id = "acme"
plan = "enterprise"

  [[accounts.locations]]
  id = "lax"
  pop = "lax"
  ipv4 = "127.0.2.100"

  [[accounts.locations]]
  id = "jfk"
  pop = "jfk"
  ipv4 = "127.0.3.100"

  [[accounts.users]]
  name = "alice"

  [[accounts.devices]]
  id = "acme-laptop"
  user = "alice"
  secret_sha256 = "{hash_secret(SECRET)}"

  [[accounts.connectors]]
  id = "acme-office"
  token_sha256 = "{token_digest(ACME_TOKEN)}"

  [[accounts.private_routes]]
  id = "office"
  kind = "tunnel"
  via = "acme-office"
  destinations = ["127.0.50.0/24", "localhost", "*.office.test"]

[[accounts]]
id = "globex"
plan = "free"

  [[accounts.users]]
  name = "gary"

  [[accounts.devices]]
  id = "globex-laptop"
  user = "gary"
  secret_sha256 = "{hash_secret(SECRET)}"

  [[accounts.connectors]]
  id = "globex-office"
  token_sha256 = "{token_digest(GLOBEX_TOKEN)}"

  [[accounts.private_routes]]
  id = "globex-lan"
  kind = "tunnel"
  via = "globex-office"
  destinations = ["127.0.60.0/24"]
''')
    return "".join(parts)


class World:
    def __init__(self, start: Start, tmp: Path) -> None:
        self.start_process = start
        self.tmp = tmp
        self.pki = tmp / "pki"
        ca = ensure_ca(self.pki)
        for code, net in POPS.items():
            ensure_server_cert(self.pki, f"pop-{code}", [code], [f"{net}.254"], ca, client=True)
        self.file = tmp / "deployment.toml"
        self.file.write_text(deployment())
        self.port = free_port([f"{net}.254" for net in POPS.values()])
        self.tunnel_port = free_port([f"{net}.10" for net in POPS.values()])
        self.listen = {code: (f"{net}.10", free_port([f"{net}.10"])) for code, net in POPS.items()}
        self.children: dict[str, EgressdProcess] = {}

    def flows(self, code: str) -> Path:
        return self.tmp / f"flows-{code}.jsonl"

    async def start(self, *codes: str) -> None:
        for code in codes:
            host, port = self.listen[code]
            self.children[code] = await self.start_process([
                "pop", "-d", str(self.file), "--pop", code, "--listen", f"{host}:{port}",
                "--pki", str(self.pki), "--backbone-port", str(self.port),
                "--tunnel-listen", f"{host}:{self.tunnel_port}", "--flow-log",
                str(self.flows(code))])
        for code in codes:
            await wait_healthy(self.listen[code])

    async def connector(self, token: str, *extra: str, codes: tuple[str, ...] = tuple(POPS)) -> EgressdProcess:
        token_file = self.tmp / f"token-{time.monotonic_ns()}"
        token_file.write_text(token)
        pops = [arg for code in codes for arg in
                ("--pop", f"{code}@{self.listen[code][0]}:{self.tunnel_port}")]
        return await self.start_process(["tunnel", "run", "--token-file", str(token_file),
                                         "--ca", str(self.pki / "ca.crt"), *pops, *extra])

    async def health(self, code: str) -> dict[str, Any]:
        return await wait_healthy(self.listen[code], within=5.0)

    async def attached(self, connector: str) -> set[str]:
        found = set()
        for code, child in self.children.items():
            if child.process.returncode is not None:
                continue
            try:
                health = await self.health(code)
            except OSError:
                continue
            if any(item["connector"] == connector for item in health.get("tunnels", [])):
                found.add(code)
        return found

    async def wait_attached(self, connector: str, count: int, within: float = 15.0) -> set[str]:
        deadline = time.monotonic() + within
        while len(found := await self.attached(connector)) < count:
            assert time.monotonic() < deadline, f"{connector} attached to {found} only"
            await asyncio.sleep(0.1)
        return found


async def through(proxy: tuple[str, int], device: str, authority: str) -> tuple[int, str, int]:
    """CONNECT as `device`: (status, first line from the origin or the refusal, client port)."""
    reader, writer = await asyncio.open_connection(*proxy)
    port = writer.get_extra_info("sockname")[1]
    try:
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                     f"Proxy-Authorization: {basic(device, SECRET)}\r\n\r\n".encode())
        response = await read_response(reader, body=False)
        if response.status != 200:
            body = await asyncio.wait_for(reader.read(4096), 5.0)
            return response.status, body.decode(errors="replace"), port
        line = (await asyncio.wait_for(reader.readline(), 5.0)).decode().strip()
        return 200, line, port
    finally:
        await close_writer(writer)


async def tell_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
    await writer.drain()
    await reader.read(65536)


def kept(path: Path, port: int) -> list[dict[str, Any]]:
    return [flow for flow in read_flows(path) if flow["hostname"] == "localhost"
            and flow["port"] == port]


async def http_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive: each answer is the source address the origin saw."""
    while await reader.readuntil(b"\r\n\r\n"):
        body = f"{writer.get_extra_info('peername')[0]}\n".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


async def test_private_origin_through_the_connector(egressd_process: Start, tmp_path: Path) -> None:
    world = World(egressd_process, tmp_path)
    await world.start(*POPS)
    connector = await world.connector(ACME_TOKEN)
    attached = await world.wait_attached("acme-office", 2)
    (spare,) = set(POPS) - attached
    async with tcp_server(ORIGIN, tell_source) as origin, \
            tcp_server("127.0.0.1", tell_source) as named:
        authority = f"{origin[0]}:{origin[1]}"
        for code in POPS:  # attached here, or over the backbone to a PoP that has it
            status, seen, port = await through(world.listen[code], "acme-laptop", authority)
            assert status == 200, (code, seen)
            # The origin sees the connector's host, never a dedicated or PoP address (R4).
            assert seen == "127.0.0.1", (code, seen)
            assert seen not in DEDICATED
            flow = await wait_flow(world.flows(code), lambda f, p=port: f["client"].endswith(f":{p}"))
            assert (flow["rule"], flow["path"], flow["route"]) == ("R4", "private-route", "office")
            assert flow["source"].startswith("127.0.0.1:") and flow["outcome"] == "ok"
        # A hostname route: the connector resolves it, inside its network.
        status, seen, port = await through(world.listen[spare], "acme-laptop",
                                           f"localhost:{named[1]}")
        assert (status, seen) == (200, "127.0.0.1")
        flow = await wait_flow(world.flows(spare), lambda f: f["client"].endswith(f":{port}"))
        assert (flow["hostname"], flow["rule"], flow["route"]) == ("localhost", "R4", "office")
        # A name only the private network knows is not resolved by the PoP: the connector
        # tries (and here fails, with its own reason).
        status, reason, _ = await through(world.listen[spare], "acme-laptop", "db.office.test:80")
        assert status == 502 and "cannot reach db.office.test:80 from the connector" in reason, reason
        # Absolute-form requests on one kept connection: the second one is decided without
        # resolving the name either.
        async with tcp_server("127.0.0.1", http_source) as web:
            result = await curl("--proxy-user", f"acme-laptop:{SECRET}", "-x",
                                "http://{}:{}".format(*world.listen[spare]),
                                f"http://localhost:{web[1]}/a", f"http://localhost:{web[1]}/b",
                                heads=False)
            assert result.body == b"127.0.0.1\n127.0.0.1\n", result
            assert await settle(lambda: len(kept(world.flows(spare), web[1])) == 2, 5.0)
            first, second = kept(world.flows(spare), web[1])
            assert first["source"] == second["source"]  # one upstream, kept
            assert second["rule"] == "R4" and second["outcome"] == "ok"
        # Another account never reaches acme's routes (R13), with the reason.
        status, reason, _ = await through(world.listen[spare], "globex-laptop", authority)
        assert status == 403 and "private route of another account" in reason, reason
        # Losing one of the connector's two PoPs keeps the origin reachable.
        gone = sorted(attached)[0]
        world.children[gone].process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for _ in range(5):
            status, seen, _ = await through(world.listen[spare], "acme-laptop", authority)
            assert (status, seen) == (200, "127.0.0.1"), (status, seen)
        assert time.monotonic() - killed < 5.0
        # The connector moves its second link to the PoP that is left.
        assert await settle(lambda: "attached to PoP " + spare in connector.stderr(), 20.0), \
            connector.stderr()
    assert ACME_TOKEN not in connector.stderr()
    assert all(ACME_TOKEN not in child.stderr() for child in world.children.values())


async def test_wrong_token_and_overlapping_routes_are_refused(
    egressd_process: Start, tmp_path: Path
) -> None:
    world = World(egressd_process, tmp_path)
    await world.start("las")
    wrong = ACME_TOKEN[:-4] + "0000"
    bad = await world.connector(wrong, codes=("las",))
    las = world.children["las"]
    assert await settle(lambda: "unknown connector or wrong token" in las.stderr(), 15.0), las.stderr()
    assert await settle(lambda: "refused the connector: unknown connector or wrong token"
                        in bad.stderr(), 15.0), bad.stderr()
    assert await world.attached("acme-office") == set()
    assert wrong not in las.stderr() and wrong not in bad.stderr()
    await bad.stop()
    # Announcing a route that overlaps globex's: that route is refused (and logged on both
    # sides), the rest is accepted.
    good = await world.connector(ACME_TOKEN, "--route", "127.0.60.0/25", "--route",
                                 "127.0.50.0/24", codes=("las",))
    await world.wait_attached("acme-office", 1)
    assert await settle(lambda: "127.0.60.0/25, which overlaps private route "
                        "globex/globex-lan of another account: refused" in las.stderr(), 10.0), \
        las.stderr()
    assert await settle(lambda: "refused route 127.0.60.0/25: overlaps a private route of "
                        "another account" in good.stderr(), 10.0), good.stderr()
    health = await world.health("las")
    assert health["tunnels"][0]["routes"] == ["127.0.50.0/24"]
    async with tcp_server("127.0.60.7", tell_source) as theirs:
        # globex's own route has no connector: a clear 502, and acme's connector is not used.
        status, reason, _ = await through(world.listen["las"], "globex-laptop",
                                          f"{theirs[0]}:{theirs[1]}")
        assert status == 502 and "connector 'globex-office' is not connected" in reason, reason
        # acme cannot reach globex's range either (R13).
        status, reason, _ = await through(world.listen["las"], "acme-laptop",
                                          f"{theirs[0]}:{theirs[1]}")
        assert status == 403 and "private route of another account" in reason, reason
    # The PoP restarts: the connector comes back on its own (backoff), routes and all.
    las.process.send_signal(signal.SIGKILL)
    await las.wait(10.0)
    assert await settle(lambda: "link to PoP las lost" in good.stderr()
                        or "link to PoP las closed" in good.stderr(), 10.0), good.stderr()
    await world.start("las")
    las = world.children["las"]
    await world.wait_attached("acme-office", 1, within=20.0)
    assert (await world.health("las"))["tunnels"][0]["routes"] == ["127.0.50.0/24"]
    # Connectors carry TCP only: a datagram to acme's route is never sent from the PoP.
    received: list[bytes] = []

    class Sink(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.append(data)

    loop = asyncio.get_running_loop()
    sink, _ = await loop.create_datagram_endpoint(Sink, local_addr=(ORIGIN, 0))
    try:
        target = sink.get_extra_info("sockname")[1]
        async with socks5_udp(world.listen["las"], ("acme-laptop", SECRET)) as udp:
            udp.send(ORIGIN, target, b"private?")
            await asyncio.sleep(0.5)
        assert received == []
        flow = await wait_flow(world.flows("las"), lambda f: f["protocol"] == "udp")
        assert flow["route"] == "office" and "UDP is not carried" in flow["error"], flow
    finally:
        sink.close()
