"""`upstream.start_connect`: the speculative confirmation of a connect that the kernel
finished before `connect` returned, and the waits it must still leave to the caller; and
`SpareSockets`, the upstream sockets made ahead of the connects that take them."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Iterator

import pytest

from egressd.model.addresses import parse_address
from egressd.pop.upstream import (
    SocketOptions,
    SpareSockets,
    UpstreamError,
    connect_outcome,
    start_connect,
)

LOCAL = parse_address("127.0.0.1")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    yield sock
    sock.close()


def test_a_connect_the_kernel_finished_at_once_is_reported_connected(listener: socket.socket) -> None:
    upstream, connected = start_connect(LOCAL, LOCAL, listener.getsockname()[1], SocketOptions())
    try:
        assert connected  # loopback: the handshake is done inside connect()
        assert upstream.getpeername() == listener.getsockname()
        assert connect_outcome(upstream, LOCAL, listener.getsockname()[1]) is None
    finally:
        upstream.close()


def test_a_connect_still_in_progress_is_left_to_the_caller(listener: socket.socket) -> None:
    """A listener whose accept queue is full drops further SYNs: the connect hangs."""
    held = []
    try:
        for _ in range(4):
            queued = socket.socket()
            queued.setblocking(False)
            queued.connect_ex(listener.getsockname())
            held.append(queued)
        upstream, connected = start_connect(LOCAL, LOCAL, listener.getsockname()[1], SocketOptions())
        held.append(upstream)
        assert not connected
        assert select.select([], [upstream], [], 0.05)[1] == []  # not writable: still connecting
    finally:
        for sock in held:
            sock.close()


def test_a_refused_connect_is_an_error_not_a_connection() -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    try:
        upstream, connected = start_connect(LOCAL, LOCAL, port, SocketOptions())
    except UpstreamError as error:  # refused inside connect() itself
        assert "refused" in error.reason
        return
    try:
        assert not connected
        select.select([], [upstream], [], 1.0)
        error = connect_outcome(upstream, LOCAL, port)
        assert error is not None and "refused" in error.reason
    finally:
        upstream.close()


def test_upstream_sockets_carry_the_local_port_range_and_no_port_yet() -> None:
    """R15: bound to the source with IP_BIND_ADDRESS_NO_PORT, and the PoP's port range set
    with IP_LOCAL_PORT_RANGE (its value packed once, the same on every socket)."""
    from egressd.pop.upstream import IP_LOCAL_PORT_RANGE, make_tcp_socket

    options = SocketOptions(local_port_range=(40000, 40999))
    for _ in range(2):
        sock = make_tcp_socket(parse_address("127.0.0.2"), options)
        try:
            try:
                value = sock.getsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, 4)
            except OSError:
                pytest.skip("this kernel has no IP_LOCAL_PORT_RANGE")
            assert int.from_bytes(value, "little") == (40999 << 16) | 40000
            assert sock.getsockname() == ("127.0.0.2", 0)  # no port until the connect
        finally:
            sock.close()


def test_a_spare_is_bound_with_no_port_and_taken_once(listener: socket.socket) -> None:
    async def body() -> None:
        spares, options, source = SpareSockets(), SocketOptions(), parse_address("127.0.0.2")
        spares.refill(source, options)
        spares.refill(source, options)  # one per source
        assert len(spares) == 1
        spare = spares._spares[source][0]
        assert spare.getsockname() == ("127.0.0.2", 0)  # R15: no port until its connect
        upstream, connected = start_connect(source, LOCAL, listener.getsockname()[1], options, spares)
        try:
            assert upstream is spare and connected and len(spares) == 0
            assert upstream.getpeername() == listener.getsockname()
            again = spares.take(source, options)  # none left: a new one
            assert again is not spare and again.getsockname() == ("127.0.0.2", 0)
            again.close()
        finally:
            upstream.close()
    asyncio.run(body())


def test_spares_made_under_other_options_are_never_used() -> None:
    async def body() -> None:
        spares, source = SpareSockets(), parse_address("127.0.0.2")
        spares.refill(source, SocketOptions())
        old = spares._spares[source][0]
        reloaded = SocketOptions(local_port_range=(40000, 40999))
        fresh = spares.take(source, reloaded)
        try:
            assert fresh is not old and old.fileno() == -1  # closed, not leaked
        finally:
            fresh.close()
    asyncio.run(body())


def test_spares_are_bounded_expire_when_idle_and_close_on_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SpareSockets, "KEPT", 2)
    monkeypatch.setattr(SpareSockets, "IDLE_SECONDS", 0.05)

    async def body() -> None:
        spares, options = SpareSockets(), SocketOptions()
        sources = [parse_address(f"127.0.0.{n}") for n in (2, 3, 4)]
        made = []
        for source in sources:
            spares.refill(source, options)
            made.append(spares._spares[source][0])
        assert len(spares) == 2 and made[0].fileno() == -1  # the oldest went
        await asyncio.sleep(0.2)
        assert len(spares) == 0 and all(sock.fileno() == -1 for sock in made)
        assert spares._timer is None  # a quiet PoP holds no spare and no timer
        spares.refill(sources[0], options)
        kept = spares._spares[sources[0]][0]
        spares.clear()
        assert len(spares) == 0 and kept.fileno() == -1 and spares._timer is None
    asyncio.run(body())


def test_a_spare_that_cannot_be_made_is_not_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refilling never raises (it runs after a reply, for the next tunnel): the connect
    that needs the socket reports why."""
    import errno

    from egressd.pop import upstream

    async def body() -> None:
        spares = SpareSockets()
        spares.refill(parse_address("192.0.2.1"), SocketOptions())  # not an address of this host
        assert len(spares) == 0

        def no_descriptors(*args: object) -> socket.socket:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(upstream, "make_tcp_socket", no_descriptors)
        spares.refill(parse_address("127.0.0.2"), SocketOptions())
        assert len(spares) == 0
    asyncio.run(body())
