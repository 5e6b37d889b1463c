"""The PoP's own epoll set: readiness callbacks, changes, removal during a batch, reuse."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from egressd.pop.poller import Poller


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def writing(fd: int, seen: list[str]) -> Poller:
    """A poller whose writer on `fd` has been called (an empty send buffer is writable)."""
    poller = Poller(asyncio.get_running_loop())
    poller.add_writer(fd, seen.append, "write")
    await turns()
    assert "write" in seen
    return poller


async def test_a_reader_is_called_while_bytes_are_unread_and_not_after_removal(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller = Poller(asyncio.get_running_loop())
    calls: list[str] = []
    poller.add_reader(a.fileno(), calls.append, "read")
    await turns()
    assert calls == []  # nothing to read
    b.send(b"x")
    await asyncio.sleep(0.01)
    assert calls and set(calls) == {"read"}  # level-triggered: again while unread
    a.recv(1)
    assert poller.remove_reader(a.fileno())
    assert not poller.remove_reader(a.fileno())
    calls.clear()
    b.send(b"y")
    await asyncio.sleep(0.01)
    assert calls == []
    assert len(poller) == 0
    poller.close()


async def test_reader_and_writer_on_one_descriptor(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    seen: list[str] = []
    poller = await writing(a.fileno(), seen)
    poller.add_reader(a.fileno(), seen.append, "read")
    poller.remove_writer(a.fileno())  # the reader keeps the registration
    seen.clear()
    b.send(b"z")
    await asyncio.sleep(0.01)
    assert seen and set(seen) == {"read"}
    poller.close()


async def test_swap_to_reader_replaces_the_writer(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    seen: list[str] = []
    poller = await writing(a.fileno(), seen)
    poller.swap_to_reader(a.fileno(), seen.append, "read")
    seen.clear()
    await turns()
    assert seen == []  # writable still, but nobody asks any more: no busy loop
    b.send(b"z")
    await asyncio.sleep(0.01)
    assert seen and set(seen) == {"read"}
    assert not poller.remove_writer(a.fileno())
    assert poller.remove_reader(a.fileno()) and len(poller) == 0
    # With no writer to replace it is add_reader.
    poller.swap_to_reader(b.fileno(), seen.append, "b")
    a.send(b"w")
    await asyncio.sleep(0.01)
    assert "b" in seen
    poller.close()


async def test_a_descriptor_removed_during_a_batch_gets_no_more_callbacks_from_it() -> None:
    poller = Poller(asyncio.get_running_loop())
    pairs = [socket.socketpair() for _ in range(4)]
    called: list[int] = []

    def on_readable(index: int) -> None:
        called.append(index)
        for other, _peer in pairs:  # the first one called removes them all
            poller.remove_reader(other.fileno())

    try:
        for index, (a, b) in enumerate(pairs):
            a.setblocking(False)
            poller.add_reader(a.fileno(), on_readable, index)
            b.send(b"!")
        await asyncio.sleep(0.01)
        assert len(called) == 1  # the others were in the same batch, and skipped
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        poller.close()


async def test_a_number_reused_after_close_without_removal_still_registers() -> None:
    poller = Poller(asyncio.get_running_loop())
    a, b = socket.socketpair()
    number = a.fileno()
    poller.add_reader(number, lambda: None)
    a.close()  # epoll forgets it by itself; the poller still has an interest
    b.close()
    c, d = socket.socketpair()
    try:
        assert number in (c.fileno(), d.fileno())
        other = d if c.fileno() == number else c
        seen: list[str] = []
        poller.add_writer(number, seen.append, "w")  # modify fails: registered anew
        poller.add_reader(number, seen.append, "r")
        other.send(b"1")
        await asyncio.sleep(0.01)
        assert {"r", "w"} <= set(seen)
    finally:
        c.close()
        d.close()
        poller.close()


async def test_a_failing_callback_goes_to_the_exception_handler_and_the_rest_run(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    poller = Poller(loop)
    seen: list[str] = []

    def boom() -> None:
        raise RuntimeError("bug")

    try:
        poller.add_reader(a.fileno(), boom)
        poller.add_writer(a.fileno(), seen.append, "w")
        b.send(b"x")
        await asyncio.sleep(0.01)
        assert errors and isinstance(errors[0]["exception"], RuntimeError)
        assert "w" in seen
    finally:
        loop.set_exception_handler(None)
        poller.close()


async def test_close_unregisters_from_the_loop(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller = Poller(asyncio.get_running_loop())
    calls: list[int] = []
    poller.add_reader(a.fileno(), calls.append, 1)
    poller.close()
    b.send(b"x")
    await asyncio.sleep(0.01)
    assert calls == []


class CountingPoller(Poller):
    batches = 0

    def _dispatch(self) -> None:
        self.batches += 1
        super()._dispatch()


async def test_a_number_reused_within_a_batch_gets_none_of_that_batch_s_events() -> None:
    """The old file's readiness must not reach the new one: a spurious EPOLLOUT on a socket
    still connecting would read as a finished connect."""
    poller = CountingPoller(asyncio.get_running_loop())
    first, first_peer = socket.socketpair()
    doomed, doomed_peer = socket.socketpair()
    number = doomed.fileno()
    made: list[socket.socket] = []
    seen: list[tuple[str, int]] = []

    def on_first() -> None:
        seen.append(("first", poller.batches))
        first.recv(1)
        poller.remove_writer(number)
        doomed.close()
        for sock in socket.socketpair():  # the lowest free number: the doomed socket's
            made.append(sock)
        reused = next(sock for sock in made if sock.fileno() == number)
        poller.add_writer(reused.fileno(), lambda: seen.append(("writer", poller.batches)))

    try:
        poller.add_reader(first.fileno(), on_first)
        first_peer.send(b"1")  # ready first, so dispatched first
        # Writable at once, so in the same batch, after `first`: its EPOLLOUT is the stale
        # event the reused number must not get.
        poller.add_writer(number, lambda: seen.append(("doomed", poller.batches)))
        await asyncio.sleep(0.02)
        assert seen[0][0] == "first"
        assert ("doomed", seen[0][1]) not in seen
        writer_batches = [batch for name, batch in seen if name == "writer"]
        assert writer_batches and min(writer_batches) > seen[0][1]
    finally:
        for sock in (first, first_peer, doomed, doomed_peer, *made):
            sock.close()
        poller.close()
