"""A tunnel connector made through the control plane and attached to `egressd serve`'s
PoPs (issue 6 item 1 of the tunnel half): the token from the API works at the PoPs once
the snapshot arrives, the connector finds the PoPs through the control plane, its status (attached PoPs, routes) shows in the API,
acme's flows reach the private origin from the connector's host (R4, even though acme has
dedicated egress), globex is refused (R13), and a re-issued token drops the old links."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from egressd.connector import ConnectorAgent, ConnectorSettings

from .helpers import curl, host_port, settle, tcp_server
from .test_serve_control import admin


async def tell_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    assert request.startswith(b"GET ")
    body = f"{writer.get_extra_info('peername')[0]}\n".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()


async def through(serve: dict[str, Any], account: str, code: str, url: str) -> tuple[int, bytes]:
    result = await curl("-K", serve["accounts"][account]["curlrc"], "-x",
                        serve["pops"][code]["http_proxy"], url)
    return result.status, result.body


async def test_a_connector_from_the_api_carries_acme_to_its_private_network(
    serve: dict[str, Any], tmp_path: Path
) -> None:
    async with admin(serve) as api:
        response = await api.post("/v1/accounts/acme/private-routes", json={
            "id": "office", "kind": "tunnel", "via": "office-1",
            "destinations": ["127.0.50.0/24"]})
        assert response.status_code == 201, response.text
        created = await api.post("/v1/accounts/acme/tunnels", json={"id": "office-1"})
        assert created.status_code == 201, created.text
        token = created.json()["token"]
        # The connector learns the PoPs from the control plane (its token authenticates).
        agent = ConnectorAgent(ConnectorSettings(token=token, pops=(), ca=Path(serve["ca_cert"]),
                                                 control=serve["control"]["url"]))
        running = asyncio.create_task(agent.run())
        try:
            # The PoPs accept it once the new snapshot (with its digest) has arrived.
            assert await settle(lambda: len(agent.attached) == 2, 15.0), agent.attached
            assert {(pop.host, pop.port) for pop in await agent.listed()} == {
                host_port(entry["tunnel"]) for entry in serve["pops"].values()}
            async with tcp_server("127.0.50.7", tell_source) as origin:
                url = f"http://{origin[0]}:{origin[1]}/"
                for code in serve["pops"]:
                    status, body = await through(serve, "acme", code, url)
                    # acme has dedicated egress, but a private route never uses it (R4).
                    assert (status, body) == (200, b"127.0.0.1\n"), (code, status, body)
                status, body = await through(serve, "globex", "las", url)
                assert status == 403 and b"private route of another account" in body
            # Status: the PoPs report the attachments; the API shows them.
            deadline = time.monotonic() + 10.0
            while True:
                shown = (await api.get("/v1/accounts/acme/tunnels/office-1")).json()
                if len(shown["attached"]) == 2:
                    break
                assert time.monotonic() < deadline, shown
                await asyncio.sleep(0.2)
            assert shown["status"] == "connected" and shown["announced"] == ["127.0.50.0/24"]
            assert shown["declared_routes"] == ["office"]
            assert {item["pop"] for item in shown["attached"]} <= set(serve["pops"])
            # A new token: the PoPs drop the links made with the old one.
            assert (await api.post("/v1/accounts/acme/tunnels/office-1/token")).status_code == 200
            assert await settle(lambda: not agent.attached, 10.0), agent.attached
            assert await settle(lambda: agent.refused >= 1, 10.0)  # it retried: refused
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
