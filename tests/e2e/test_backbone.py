"""The backbone between real `egressd pop` processes (issue 5 items 1-3, on loopback):
flows carried over mutually authenticated TLS to the PoP that owns the dedicated address
and leaving from it (R7), the egress PoP refusing an address the account does not own
(R13), RTT probes, and a dead PoP avoided within 3 s (R11) with flows through it ended."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from egressd.mux import MuxClient, MuxError, StreamRefused, client_context
from egressd.pki import ensure_ca, ensure_server_cert
from egressd.pop.backbone import header_fields
from egressd.pop.identity import hash_secret
from egressd.pop.runtime import FlowHeader

from .helpers import basic, close_writer, read_response, socks5_connect, socks5_udp, tcp_server
from .processes import EgressdProcess, Start, wait_healthy

pytestmark = pytest.mark.slow

SECRET = "backbone-test-secret"
POPS = {"las": "127.0.1", "lax": "127.0.2", "jfk": "127.0.3"}
CITIES = {"las": ("Las Vegas", 36.17, -115.14), "lax": ("Los Angeles", 34.05, -118.24),
          "jfk": ("New York", 40.71, -74.01)}


def deployment() -> str:
    parts = ['[deployment]\nallow_destinations = ["127.0.0.1/32"]\n']
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

  [accounts.network]
  proxy_udp = true

  [[accounts.locations]]
  id = "lax"
  pop = "lax"
  ipv4 = "127.0.2.100"
  ipv6 = "2001:db8:120::/48"

  [[accounts.locations]]
  id = "jfk"
  pop = "jfk"
  ipv4 = "127.0.3.100"
  ipv6 = "2001:db8:130::/48"

  [[accounts.users]]
  name = "alice"

  [[accounts.devices]]
  id = "acme-laptop"
  user = "alice"
  secret_sha256 = "{hash_secret(SECRET)}"

  [[accounts.policies]]
  id = "via-la"
  action = "dedicated"
  primary = "lax"
  secondary = "jfk"

[[accounts]]
id = "globex"
plan = "free"
''')
    return "".join(parts)


def free_port(hosts: list[str]) -> int:
    for _ in range(50):
        probe = socket.socket()
        probe.bind((hosts[0], 0))
        port = probe.getsockname()[1]
        probe.close()
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


class Backbone:
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
        self.listen = {code: (f"{net}.10", free_port([f"{net}.10"])) for code, net in POPS.items()}
        self.children: dict[str, EgressdProcess] = {}

    async def start(self, code: str, workers: int = 1) -> None:
        host, port = self.listen[code]
        self.children[code] = await self.start_process([
            "pop", "-d", str(self.file), "--pop", code, "--listen", f"{host}:{port}",
            "--pki", str(self.pki), "--backbone-port", str(self.port), "--flow-log", "off",
            "--workers", str(workers)])
        await wait_healthy(self.listen[code])
        await self.children[code].wait_ready(workers=workers)

    async def converged(self, within: float = 10.0) -> None:
        """Until every running PoP sees the others up (one started before its peers retries)."""
        deadline = time.monotonic() + within
        while True:
            views = {code: (await self.health(code))["backbone"] for code in self.children}
            if all(peer["up"] for view in views.values() for code, peer in view.items()
                   if code in self.children):
                return
            assert time.monotonic() < deadline, f"backbone not converged: {views}"
            await asyncio.sleep(0.1)

    async def health(self, code: str) -> dict[str, Any]:
        return await wait_healthy(self.listen[code], within=5.0)


async def seen_source(proxy: tuple[str, int], origin: tuple[str, int]) -> str:
    """CONNECT through `proxy` to the origin, which answers with the source it saw."""
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        authority = f"{origin[0]}:{origin[1]}"
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                     f"Proxy-Authorization: {basic('acme-laptop', SECRET)}\r\n\r\n".encode())
        response = await read_response(reader, body=False)
        if response.status != 200:
            return f"HTTP {response.status}"
        return (await asyncio.wait_for(reader.readline(), 5.0)).decode().strip()
    finally:
        await close_writer(writer)


async def tell_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
    await writer.drain()
    await reader.read(65536)  # until the client goes


async def test_flows_cross_the_backbone_and_fail_over(egressd_process: Start, tmp_path: Path) -> None:
    lab = Backbone(egressd_process, tmp_path)
    for code in POPS:
        await lab.start(code)
    await lab.converged()
    async with tcp_server("127.0.0.1", tell_source) as origin:
        las = lab.listen["las"]
        # R7: attached in Las Vegas, carried to Los Angeles, leaves from acme's address there.
        assert await seen_source(las, origin) == "127.0.2.100"
        assert await seen_source(lab.listen["jfk"], origin) == "127.0.2.100"
        assert await seen_source(lab.listen["lax"], origin) == "127.0.2.100"  # local
        # The health monitor measured RTTs to both peers.
        peers = (await lab.health("las"))["backbone"]
        assert set(peers) == {"lax", "jfk"}
        assert all(peer["up"] and peer["rtt_ms"] > 0 for peer in peers.values()), peers
        # A tunnel in flight through lax...
        reader, writer = await asyncio.open_connection(*las)
        authority = f"{origin[0]}:{origin[1]}"
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                     f"Proxy-Authorization: {basic('acme-laptop', SECRET)}\r\n\r\n".encode())
        assert (await read_response(reader, body=False)).status == 200
        assert (await reader.readline()).strip() == b"127.0.2.100"
        # ...when lax dies: new flows leave from the secondary, New York, within 3 s (R11),
        lab.children["lax"].process.kill()
        killed = time.monotonic()
        while (source := await seen_source(las, origin)) != "127.0.3.100":
            assert time.monotonic() - killed < 3.0, f"still {source} after 3 s"
            await asyncio.sleep(0.05)
        print(f"\nR11 failover: new flows left New York {time.monotonic() - killed:.2f} s "
              "after the Los Angeles PoP died")
        # and the tunnel through it has ended.
        async with asyncio.timeout(5.0):
            with contextlib.suppress(ConnectionResetError):  # ended with an error: also an end
                assert await reader.read() == b""
        await close_writer(writer)
        assert (await lab.health("las"))["backbone"]["lax"]["up"] is False


class UdpTell(asyncio.DatagramProtocol):
    """A UDP origin that answers each datagram with the source address it came from."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.transport.sendto(f"{addr[0]} {data.decode()}".encode(), addr)


async def test_socks5_connect_to_an_address_crosses_the_backbone(egressd_process: Start, tmp_path: Path) -> None:
    """SOCKS5 CONNECT to an address literal (curl -x socks5://, no remote name). A regression
    found in the lab: the socket pair to the link has no address for BND.ADDR, and the PoP
    failed the handshake with a traceback."""
    lab = Backbone(egressd_process, tmp_path)
    for code in ("las", "lax"):
        await lab.start(code)
    await lab.converged()
    async with tcp_server("127.0.0.1", tell_source) as origin:
        for _ in range(2):  # the first and the next: both handshake paths of the listener
            reply, reader, writer = await socks5_connect(lab.listen["las"], ("acme-laptop", SECRET), *origin)
            try:
                assert reply == 0
                assert (await asyncio.wait_for(reader.readline(), 5.0)).strip() == b"127.0.2.100"
            finally:
                await close_writer(writer)
    assert "Traceback" not in lab.children["las"].stderr()


async def test_the_backbone_with_several_workers(egressd_process: Start, tmp_path: Path) -> None:
    """--workers 2 on both PoPs: each worker links to the peer and serves the backbone port;
    every flow, whichever worker takes it at either end, leaves from acme's LA address."""
    lab = Backbone(egressd_process, tmp_path)
    await lab.start("las", workers=2)
    await lab.start("lax", workers=2)
    async with tcp_server("127.0.0.1", tell_source) as origin:
        deadline = time.monotonic() + 10
        while True:  # every las worker has probed lax (any one answers /health)
            views = [(await lab.health("las"))["backbone"]["lax"]["up"] for _ in range(6)]
            if all(views):
                break
            assert time.monotonic() < deadline, "the las workers do not all see lax"
            await asyncio.sleep(0.2)
        sources = await asyncio.gather(*(seen_source(lab.listen["las"], origin) for _ in range(40)))
        assert set(sources) == {"127.0.2.100"}
    assert len(lab.children["las"].workers()) == 2 and "Traceback" not in lab.children["lax"].stderr()


async def test_udp_crosses_the_backbone(egressd_process: Start, tmp_path: Path) -> None:
    lab = Backbone(egressd_process, tmp_path)
    for code in ("las", "lax"):
        await lab.start(code)
    await lab.converged()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(UdpTell, local_addr=("127.0.0.1", 0))
    try:
        origin = transport.get_extra_info("sockname")[:2]
        async with socks5_udp(lab.listen["las"], ("acme-laptop", SECRET)) as udp:
            for index in range(3):
                udp.send(origin[0], origin[1], f"hello {index}".encode())
                host, port, payload = await udp.recv()
                assert (host, port) == tuple(origin)
                # proxy.udp on: UDP leaves Los Angeles from acme's address there (R7).
                assert payload == f"127.0.2.100 hello {index}".encode()
    finally:
        transport.close()


async def test_the_egress_pop_refuses_what_the_account_does_not_own(
    egressd_process: Start, tmp_path: Path
) -> None:
    lab = Backbone(egressd_process, tmp_path)
    await lab.start("lax")
    context = client_context(lab.pki / "pop-las.crt", lab.pki / "pop-las.key", lab.pki / "ca.crt")
    client = MuxClient("127.0.2.254", lab.port, context, server_hostname="lax")
    try:
        for account, source in (("globex", "127.0.2.100"), ("acme", "127.0.3.100"),
                                ("acme", "127.0.2.1")):
            header = FlowHeader(flow_id="t", account=account,
                                source_address=ipaddress.ip_address(source),
                                destination=ipaddress.ip_address("127.0.0.1"),
                                port=9, protocol="tcp")
            with pytest.raises(StreamRefused) as refused:
                await client.open(header_fields(header), protocol="egressd-tcp")
            assert refused.value.status == 403 and "not an active dedicated address" in refused.value.reason
        assert await client.ping() > 0
    finally:
        await client.close()
    # A PoP certificate from another CA is refused at the handshake.
    other = tmp_path / "other"
    rogue = ensure_server_cert(other, "pop-las", ["las"], [], ensure_ca(other), client=True)
    context = client_context(rogue.cert_path, rogue.key_path, lab.pki / "ca.crt")
    client = MuxClient("127.0.2.254", lab.port, context, server_hostname="lax")
    try:
        with pytest.raises(MuxError):
            await client.ping()
    finally:
        await client.close()


async def test_a_silent_pop_is_avoided_and_its_flows_end(egressd_process: Start, tmp_path: Path) -> None:
    """A frozen PoP sends no reset: the health monitor must notice the silence, avoid it for
    new flows and drop the link so the flows through it end (R11)."""
    lab = Backbone(egressd_process, tmp_path)
    for code in POPS:
        await lab.start(code)
    await lab.converged()
    async with tcp_server("127.0.0.1", tell_source) as origin:
        las = lab.listen["las"]
        reader, writer = await asyncio.open_connection(*las)
        authority = f"{origin[0]}:{origin[1]}"
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                     f"Proxy-Authorization: {basic('acme-laptop', SECRET)}\r\n\r\n".encode())
        assert (await read_response(reader, body=False)).status == 200
        assert (await reader.readline()).strip() == b"127.0.2.100"
        lax = lab.children["lax"]
        lax.signal(signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            while (source := await seen_source(las, origin)) != "127.0.3.100":
                assert time.monotonic() - stopped < 3.0, f"still {source} after 3 s"
                await asyncio.sleep(0.05)
            async with asyncio.timeout(5.0):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
        finally:
            lax.signal(signal.SIGCONT)
            await close_writer(writer)
