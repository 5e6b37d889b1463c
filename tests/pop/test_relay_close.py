"""How a splice relay lets go of its sockets: removed from the readiness set one by one, or,
when it alone holds them (`sole_owner`, the plain handshake's relays), forgotten by the
`Poller` and left to `close` to take out of epoll."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from egressd.pop.poller import Poller
from egressd.pop.relay import PipePool, RelayRegistry, RelayResult, SpliceRelay


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class CountingPoller(Poller):
    """Counts removals: each one that empties a descriptor's interest is an `epoll_ctl`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.removals = 0

    def remove_reader(self, fd: int) -> bool:
        self.removals += 1
        return super().remove_reader(fd)

    def remove_writer(self, fd: int) -> bool:
        self.removals += 1
        return super().remove_writer(fd)


async def _until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not within the time")


def _read(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(16)
    except BlockingIOError:
        return None


async def _still_polled(poller: Poller, numbers: list[int]) -> None:
    """Sockets that reuse `numbers` register and get their events: epoll holds nothing of
    the closed ones (a stale registration would make `register` fail or eat the events)."""
    pairs = [_pair() for _ in numbers]
    try:
        reused = [sock for pair in pairs for sock in pair if sock.fileno() in numbers]
        assert len(reused) == len(numbers)
        seen: list[int] = []
        for sock in reused:
            poller.add_reader(sock.fileno(), seen.append, sock.fileno())
        for a, b in pairs:
            a.send(b"x")
            b.send(b"x")
        await _until(lambda: set(numbers) <= set(seen))
        for sock in reused:
            poller.remove_reader(sock.fileno())
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@dataclass
class Rig:
    """A relay between two socket pairs: the device's end, the relay's two, the origin's."""

    relay: SpliceRelay
    registry: RelayRegistry
    results: list[RelayResult]
    client: socket.socket
    device: socket.socket
    upstream: socket.socket
    origin: socket.socket

    @property
    def numbers(self) -> list[int]:
        return [self.relay.up.src_fd, self.relay.down.src_fd]


@contextlib.contextmanager
def rig(readiness: Any, *, sole_owner: bool) -> Iterator[Rig]:
    pool, registry = PipePool(), RelayRegistry(idle_timeout=30.0, max_lifetime=None)
    client, device = _pair()
    upstream, origin = _pair()
    results: list[RelayResult] = []
    relay = SpliceRelay(readiness, pool, client, upstream, results.append, registry, sole_owner=sole_owner)
    relay.start()
    try:
        yield Rig(relay, registry, results, client, device, upstream, origin)
    finally:
        registry.close_all()
        for sock in (client, device, upstream, origin):
            sock.close()
        pool.close()


@pytest.mark.parametrize("sole_owner", [True, False])
async def test_a_tunnel_that_ends_lets_go_of_both_sockets(sole_owner: bool) -> None:
    poller = CountingPoller(asyncio.get_running_loop())
    try:
        with rig(poller, sole_owner=sole_owner) as tunnel:
            numbers = tunnel.numbers
            tunnel.device.send(b"QUIT\n")
            await _until(lambda: _read(tunnel.origin) == b"QUIT\n")
            tunnel.origin.send(b"BYE\n")
            await _until(lambda: _read(tunnel.device) == b"BYE\n")
            tunnel.origin.close()  # the upstream ends first: the client's side is half-closed
            await _until(lambda: _read(tunnel.device) == b"")
            tunnel.device.close()
            await _until(lambda: bool(tunnel.results))
            assert tunnel.results == [RelayResult(5, 4, "upstream", None)]
            assert len(poller) == 0 and len(tunnel.registry) == 0 and tunnel.client.fileno() == -1
            # The upstream's EOF removes its reader either way; then the client's EOF ends
            # the tunnel, and a sole owner closes its socket with no removal.
            assert poller.removals == (1 if sole_owner else 2)
            await _still_polled(poller, numbers)
    finally:
        poller.close()


async def test_a_swept_tunnel_of_a_sole_owner_is_forgotten_and_closed() -> None:
    poller = CountingPoller(asyncio.get_running_loop())
    try:
        with rig(poller, sole_owner=True) as tunnel:
            numbers = tunnel.numbers
            assert len(poller) == 2
            assert tunnel.registry.sweep(tunnel.relay.last_activity + 31) == 1
            assert [result.closed_by for result in tunnel.results] == ["idle-timeout"]
            assert len(poller) == 0 and poller.removals == 0
            assert tunnel.device.recv(16) == b"" and tunnel.origin.recv(16) == b""  # both closed
            await _still_polled(poller, numbers)
    finally:
        poller.close()


async def test_a_relay_on_the_event_loop_is_never_a_sole_owner() -> None:
    """The loop has no `forget`: its relays always remove their descriptors."""
    with rig(asyncio.get_running_loop(), sole_owner=True) as tunnel:
        assert tunnel.relay.forget is None
        tunnel.registry.close_all()
        assert [result.closed_by for result in tunnel.results] == ["shutdown"]
