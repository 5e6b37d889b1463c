"""The relay sweeper: idle and lifetime limits take `now`, so they are tested without sleeping."""

from __future__ import annotations

import asyncio
import socket

from egressd.pop.relay import PipePool, RelayRegistry, RelayResult, SpliceRelay


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_idle_and_lifetime_limits_close_relays_with_their_reason() -> None:
    loop = asyncio.get_running_loop()
    registry = RelayRegistry(idle_timeout=30.0, max_lifetime=60.0)
    pool = PipePool()
    results: dict[str, RelayResult] = {}
    peers = []
    relays = {}
    for name in ("idle", "busy", "old"):
        client, client_peer = _pair()
        upstream, upstream_peer = _pair()
        peers += [client_peer, upstream_peer]
        relay = SpliceRelay(loop, pool, client, upstream, lambda result, n=name: results.__setitem__(n, result), registry)
        relay.start()
        relays[name] = relay
    start = relays["idle"].started
    relays["busy"].last_activity = start + 50  # traffic recently
    relays["old"].started = start - 40  # lives longer than max_lifetime at start + 25
    relays["old"].last_activity = start + 20

    assert registry.sweep(start + 25) == 1  # only "old": 65 s of life > 60 s
    assert results["old"].closed_by == "lifetime"
    assert registry.sweep(start + 45) == 1  # "idle": 45 s without a byte > 30 s
    assert results["idle"].closed_by == "idle-timeout"
    assert "busy" not in results and len(registry) == 1
    registry.close_all()
    assert results["busy"].closed_by == "shutdown" and len(registry) == 0
    for sock in peers:
        sock.close()
    pool.close()
