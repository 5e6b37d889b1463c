"""The same link on uvloop, the event loop production runs (its transports and clock
differ from asyncio's: a regression here once broke every connection)."""

from __future__ import annotations

import asyncio

import uvloop

from egressd.mux import MuxClient, MuxServer, client_context, server_context

from .conftest import SERVER_NAME, Pki
from .test_link import echo, read_all


def test_echo_flows_and_ping_on_uvloop(pki: Pki) -> None:
    uvloop.run(_flows_and_ping(pki))


async def _flows_and_ping(pki: Pki) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    server = MuxServer(server_context(pki.pop.cert, pki.pop.key, pki.ca), echo)
    await server.start()
    client = MuxClient(
        *server.address,
        client_context(pki.pop.cert, pki.pop.key, pki.ca),
        server_hostname=SERVER_NAME,
    )
    try:

        async def one(index: int) -> bytes:
            async with await client.open({}) as stream:
                await stream.write(b"flow %d" % index)
                await stream.write_eof()
                return await read_all(stream)

        results = await asyncio.gather(*(one(i) for i in range(100)))
        assert results == [b"flow %d" % i for i in range(100)]
        assert server.connections_accepted == 1
        rtt = await client.ping()
        assert 0 < rtt < 0.5  # uvloop's loop.time() ticks in milliseconds: not used for RTT
        assert rtt != 1e-9
    finally:
        await client.close()
        await server.close()
