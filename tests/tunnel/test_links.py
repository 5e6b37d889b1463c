"""Connector links in one process, with real TLS sockets on loopback: the PoP's
`TunnelServer` against hand-made connectors (garbage announcements, a wrong token, a
connector deleted from the configuration), and the real `ConnectorAgent` against a
hand-made PoP that asks for a destination the connector never announced."""

from __future__ import annotations

import asyncio
import io
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.e2e.helpers import settle

from egressd.connector import ConnectorAgent, ConnectorSettings, PopAddress
from egressd.decide import HealthView
from egressd.model.deployment import load_deployment
from egressd.mux import MuxStream, StreamRefused
from egressd.mux.client import connect_request
from egressd.mux.link import Link
from egressd.mux.reverse import ReverseListener, ServedLink, dial_reverse
from egressd.pki import ensure_ca, ensure_server_cert
from egressd.pop.device_link import device_tls_context
from egressd.pop.flowlog import FlowLog
from egressd.pop.metrics import PopMetrics
from egressd.pop.resolver import Resolver
from egressd.pop.runtime import NoBackbone, PopOptions, PopRuntime, StateHolder, TunnelFlow
from egressd.pop.tunnel_link import TunnelServer
from egressd.pop.upstream import UpstreamError
from egressd.protocols.tunnel import FLOW, HELLO, ROUTES_HEADER, TOKEN_HEADER, Verdict, token_digest

TOKEN = "egdt.acme-office.00112233445566778899aabbccddeeff0011223344556677"

DEPLOYMENT = f"""
[deployment]
allow_destinations = ["127.0.50.0/24"]

[[data_centers]]
code = "tst"
city = "Loopback"
country = "ZZ"
latitude = 0.0
longitude = 0.0
shared_ipv4 = ["127.0.0.2"]

[[accounts]]
id = "acme"

  [[accounts.connectors]]
  id = "acme-office"
  token_sha256 = "{token_digest(TOKEN)}"

  [[accounts.private_routes]]
  id = "office"
  via = "acme-office"
  destinations = ["127.0.50.0/24"]

[[accounts]]
id = "globex"
"""


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = ensure_ca(tmp_path)
    ensure_server_cert(tmp_path, "pop-tst", ["tst"], ["127.0.0.1"], ca)
    return tmp_path


@pytest.fixture
async def pop(pki: Path) -> AsyncIterator[TunnelServer]:
    holder = StateHolder(load_deployment(DEPLOYMENT), HealthView(up=frozenset({"tst"})))
    runtime = PopRuntime("tst", holder, NoBackbone(), Resolver(), PopOptions(handshake_timeout=3.0),
                         FlowLog(io.StringIO()), PopMetrics())
    server = TunnelServer(runtime, device_tls_context(pki / "pop-tst.crt", pki / "pop-tst.key"),
                          "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
    assert not server._tasks


def client_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.set_alpn_protocols(["h2"])
    return context


async def hand_made(pop: TunnelServer, pki: Path, headers: dict[str, str]) -> tuple[Verdict, ServedLink]:
    """A connector that answers the hello with `headers` and returns the first verdict."""
    verdict: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()

    async def handle(stream: MuxStream) -> None:
        if stream.headers.get(":protocol") != HELLO:
            await stream.refuse(501, "no")
            return
        await stream.accept(headers)
        line = b""
        while b"\n" not in line and (data := await stream.read()):
            line += data
        if not verdict.done():
            verdict.set_result(Verdict.decode(line.split(b"\n")[0]))
        while await stream.read():
            pass

    served = await dial_reverse(*pop.address, client_context(pki), handle,
                                server_hostname="tst")
    async with asyncio.timeout(5.0):
        return await verdict, served


async def test_garbage_and_wrong_tokens_get_a_clear_verdict(pop: TunnelServer, pki: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    for headers, error in (
        ({}, "unknown connector or wrong token"),
        ({TOKEN_HEADER: TOKEN[:-1] + "0"}, "unknown connector or wrong token"),
        ({TOKEN_HEADER: "x" * 5000}, "unknown connector or wrong token"),
        ({TOKEN_HEADER: TOKEN, ROUTES_HEADER: "10.0.0.0/8,not a route"}, "bad announcement"),
        ({TOKEN_HEADER: TOKEN, ROUTES_HEADER: "10.0.0.1/8"}, "bad announcement"),
    ):
        verdict, served = await hand_made(pop, pki, headers)
        assert not verdict.accepted and error in verdict.error, (headers, verdict)
        async with asyncio.timeout(5.0):  # the PoP hangs up
            await served.closed
        await served.close()
    assert pop.attachments == {}
    assert "wrong token" in caplog.text and TOKEN not in caplog.text


async def test_a_deleted_connector_is_dropped_and_its_flows_refused(pop: TunnelServer,
                                                                    pki: Path) -> None:
    verdict, served = await hand_made(pop, pki, {TOKEN_HEADER: TOKEN})
    assert verdict.accepted and verdict.routes == ("127.0.50.0/24",)
    assert [item["connector"] for item in pop.status()] == ["acme-office"]
    flow = TunnelFlow("f1", "globex", "127.0.50.7", 80)
    with pytest.raises(UpstreamError, match="does not belong to account 'globex'"):
        await pop.open_tcp("acme-office", flow)  # R13, even when asked directly
    with pytest.raises(UpstreamError, match="not attached"):
        await pop.open_tcp("acme-office", TunnelFlow("f2", "acme", "10.9.9.9", 80))
    # The route narrowed by a new snapshot: the PoP carries only what is declared now.
    narrowed = DEPLOYMENT.replace('"127.0.50.0/24"]\n\n[[accounts]]', '"127.0.50.0/25"]\n\n[[accounts]]')
    assert narrowed != DEPLOYMENT
    pop.runtime.state.replace(load_deployment(narrowed, version=2))
    assert await settle(lambda: pop.status()[0]["routes"] == ["127.0.50.0/25"], 5.0), pop.status()
    with pytest.raises(UpstreamError, match=r"not attached to PoP tst with a route to 127\.0\.50\.200"):
        await pop.open_tcp("acme-office", TunnelFlow("f3", "acme", "127.0.50.200", 80))
    # Its token replaced (as `egressd tunnel token` does): the PoP drops the link.
    replaced = DEPLOYMENT.replace(token_digest(TOKEN), token_digest(TOKEN + "new"))
    pop.runtime.state.replace(load_deployment(replaced, version=3))
    async with asyncio.timeout(8.0):
        await served.closed
    await served.close()
    assert pop.attachments == {}


async def test_the_connector_opens_only_what_it_announced(pki: Path, tmp_path: Path) -> None:
    """A hand-made PoP: accepts the connector, then asks for an announced destination (the
    connector connects from its host) and for one it never announced (refused)."""
    links: asyncio.Queue[Link] = asyncio.Queue()
    listener = ReverseListener(device_tls_context(pki / "pop-tst.crt", pki / "pop-tst.key"),
                               links.put_nowait)
    await listener.start()

    async def tell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
        await writer.drain()
        writer.close()

    origin = await asyncio.start_server(tell, "127.0.50.7", 0)
    port = origin.sockets[0].getsockname()[1]
    agent = ConnectorAgent(ConnectorSettings(
        token=TOKEN, pops=(PopAddress("127.0.0.1", listener.address[1], "tst"),),
        ca=pki / "ca.crt", links=1))
    running = asyncio.create_task(agent.run())
    try:
        async with asyncio.timeout(10.0):
            link = await links.get()
            await link.ready
            hello = await link.open(connect_request({}, HELLO))
            assert hello.response_headers[TOKEN_HEADER] == TOKEN
            await hello.write(Verdict(True, "tst", "acme-office", "acme",
                                      ("127.0.50.7/32",)).encode())
            assert await settle(lambda: bool(agent.attached), 5.0)
            stream = await link.open(connect_request(
                {"egressd-flow": "f1", "egressd-host": "127.0.50.7", "egressd-port": str(port)}, FLOW))
            assert stream.response_headers["egressd-local"].startswith("127.0.0.1:")
            assert await stream.read() == b"127.0.0.1\n"
            stream.release()
            for host, wanted in (("127.0.50.8", port), ("127.0.0.1", port), ("", port),
                                 ("127.0.50.7", 0)):
                with pytest.raises(StreamRefused) as refused:
                    await link.open(connect_request(
                        {"egressd-flow": "f2", "egressd-host": host, "egressd-port": str(wanted)},
                        FLOW))
                assert refused.value.status == 403 and "not a route this connector announced" in refused.value.reason
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        origin.close()
        await origin.wait_closed()
        await listener.close()


async def test_flows_through_a_real_connector_leave_nothing_behind(pop: TunnelServer, pki: Path) -> None:
    """50 flows through the PoP's side and a real connector: each is answered from the
    connector's host; afterwards no flow task, stream or descriptor is left, and stopping
    the connector detaches it."""
    async def tell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
        await writer.drain()
        await reader.read()
        writer.close()

    origin = await asyncio.start_server(tell, "127.0.50.7", 0)
    port = origin.sockets[0].getsockname()[1]
    agent = ConnectorAgent(ConnectorSettings(
        token=TOKEN, pops=(PopAddress("127.0.0.1", pop.address[1], "tst"),), ca=pki / "ca.crt"))
    running = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    try:
        assert await settle(lambda: bool(pop.attachments), 5.0)
        baseline_fds, baseline_tasks = len(os.listdir("/proc/self/fd")), len(pop._tasks)
        for index in range(50):
            sock = await pop.open_tcp("acme-office", TunnelFlow(f"f{index}", "acme", "127.0.50.7", port))
            try:
                async with asyncio.timeout(5.0):
                    assert await loop.sock_recv(sock, 100) == b"127.0.0.1\n"
            finally:
                sock.close()
        assert await settle(lambda: len(pop._tasks) == baseline_tasks, 5.0), pop._tasks
        link = next(iter(pop.attachments["acme-office"])).link
        assert await settle(lambda: link.core.stream_count <= 1, 5.0)  # the hello only
        assert await settle(lambda: len(os.listdir("/proc/self/fd")) <= baseline_fds, 5.0)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        origin.close()
        await origin.wait_closed()
    assert await settle(lambda: not pop.attachments, 8.0)


async def test_a_route_declared_later_reaches_the_connector(pop: TunnelServer, pki: Path) -> None:
    """The configuration grows while the connector is attached: the PoP re-checks, tells
    the connector with a new verdict, and flows to the new part go through."""
    narrowed = DEPLOYMENT.replace('"127.0.50.0/24"]\n\n[[accounts]]', '"127.0.50.0/25"]\n\n[[accounts]]')
    pop.runtime.state.replace(load_deployment(narrowed, version=2))

    async def tell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    origin = await asyncio.start_server(tell, "127.0.50.200", 0)
    port = origin.sockets[0].getsockname()[1]
    agent = ConnectorAgent(ConnectorSettings(
        token=TOKEN, pops=(PopAddress("127.0.0.1", pop.address[1], "tst"),), ca=pki / "ca.crt"))
    running = asyncio.create_task(agent.run())
    flow = TunnelFlow("f1", "acme", "127.0.50.200", port)
    try:
        assert await settle(lambda: bool(pop.status()), 5.0)
        assert pop.status()[0]["routes"] == ["127.0.50.0/25"]
        with pytest.raises(UpstreamError, match="not attached"):
            await pop.open_tcp("acme-office", flow)
        pop.runtime.state.replace(load_deployment(DEPLOYMENT, version=3))
        assert await settle(lambda: pop.status()[0]["routes"] == ["127.0.50.0/24"], 5.0)
        state = next(iter(agent.links.values()))
        assert await settle(lambda: bool(state.covers("127.0.50.200")), 5.0)
        sock = await pop.open_tcp("acme-office", flow)
        try:
            async with asyncio.timeout(5.0):
                assert await asyncio.get_running_loop().sock_recv(sock, 100) == b"hello\n"
        finally:
            sock.close()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        origin.close()
        await origin.wait_closed()


async def test_links_per_connector_are_capped(pop: TunnelServer, pki: Path) -> None:
    from egressd.pop.tunnel_link import MAX_LINKS

    served: list[ServedLink] = []
    try:
        for _ in range(MAX_LINKS):
            verdict, link = await hand_made(pop, pki, {TOKEN_HEADER: TOKEN})
            served.append(link)
            assert verdict.accepted
        verdict, link = await hand_made(pop, pki, {TOKEN_HEADER: TOKEN})
        served.append(link)
        assert not verdict.accepted and "too many links" in verdict.error
        assert len(pop.status()) == MAX_LINKS
    finally:
        for link in served:
            await link.close()
    assert await settle(lambda: not pop.attachments, 8.0)
