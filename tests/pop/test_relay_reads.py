"""How much a splice relay reads per wake-up: a message once (no `splice` that can only
say EAGAIN), a transfer in progress until the socket is empty. Real TCP sockets on
127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from egressd.pop.poller import Poller
from egressd.pop.relay import BULK_READ, PipePool, RelayRegistry, RelayResult, SpliceRelay


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


@pytest.fixture
def splices_from(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The source descriptors of every `splice` the test makes."""
    sources: list[int] = []
    real = os.splice

    def counting(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        sources.append(src)
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(os, "splice", counting)
    yield sources


def _one_wakeup(payload: bytes, splices_from: list[int]) -> tuple[int, bytes]:
    """Send `payload` to a relay's client socket, run the client direction's reader once:
    how many `splice` calls read the client socket, and what reached the far end."""
    async def body() -> tuple[int, bytes]:
        client_far, client = _tcp_pair()
        upstream, upstream_far = _tcp_pair()
        poller, pipes = Poller(asyncio.get_running_loop()), PipePool()
        ended: list[RelayResult] = []
        relay = SpliceRelay(poller, pipes, client, upstream, ended.append, RelayRegistry(60.0, 0.0))
        try:
            client_far.setblocking(True)
            client_far.sendall(payload)
            await asyncio.sleep(0.05)  # all of it in the client socket
            splices_from.clear()
            relay.up.on_readable()
            reads = splices_from.count(client.fileno())
            received = b""
            for _ in range(100):  # what that one wake-up moved arrives within a second
                await asyncio.sleep(0.01)
                with contextlib.suppress(BlockingIOError):
                    received += upstream_far.recv(1 << 20)
                if len(received) == len(payload):
                    break
            return reads, received
        finally:
            relay.close("shutdown", None)
            for sock in (client_far, upstream_far):
                sock.close()
            pipes.close()
            poller.close()

    return asyncio.run(body())


def test_a_message_is_read_with_one_splice(splices_from: list[int]) -> None:
    reads, received = _one_wakeup(b"QUIT\n", splices_from)
    assert received == b"QUIT\n"
    assert reads == 1  # not a second one that could only say EAGAIN


def test_a_large_read_is_followed_at_once_by_the_next_round(splices_from: list[int]) -> None:
    """A transfer in progress: the next round goes on in the same wake-up (here it finds
    the socket empty), where the sender has often refilled it."""
    payload = os.urandom(4 * BULK_READ)
    reads, received = _one_wakeup(payload, splices_from)
    assert received == payload
    assert reads >= 2
