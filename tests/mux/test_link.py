"""egressd.mux over real sockets and real TLS on 127.0.0.1, with certificates from egressd.pki."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from egressd.mux import (
    DatagramStream,
    LinkSettings,
    MuxClient,
    MuxError,
    MuxServer,
    MuxStream,
    PeerIdentity,
    PumpError,
    StreamRefused,
    StreamReset,
    client_context,
    pump,
    server_context,
)
from egressd.mux.errors import Side

from .conftest import SERVER_NAME, Pki

Handler = Callable[[MuxStream, PeerIdentity], Awaitable[None]]
MIB = 1 << 20


async def echo(stream: MuxStream, peer: PeerIdentity) -> None:
    await stream.accept({"egressd-peer": peer.common_name})
    await echo_accepted(stream)


async def echo_accepted(stream: MuxStream) -> None:
    while data := await stream.read():
        await stream.write(data)
    await stream.write_eof()


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - polling state that has no event
            await asyncio.sleep(0.01)


async def read_all(stream: MuxStream) -> bytes:
    chunks = []
    while data := await stream.read():
        chunks.append(data)
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def running(pki: Pki, handler: Handler, port: int = 0) -> AsyncIterator[MuxServer]:
    server = MuxServer(server_context(pki.pop.cert, pki.pop.key, pki.ca), handler, port=port)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def dialing(
    server: MuxServer, context: ssl.SSLContext, name: str = SERVER_NAME
) -> AsyncIterator[MuxClient]:
    client = MuxClient(*server.address, context, server_hostname=name, connect_timeout=5)
    try:
        yield client
    finally:
        await client.close()


def pop_client_context(pki: Pki) -> ssl.SSLContext:
    return client_context(pki.pop.cert, pki.pop.key, pki.ca)


async def test_echo_round_trip_carries_headers_and_peer_identity(pki: Pki) -> None:
    seen: list[tuple[dict[str, str], PeerIdentity]] = []

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        seen.append((stream.headers, peer))
        await echo(stream, peer)

    async with running(pki, handler) as server, dialing(server, pop_client_context(pki)) as client:
        stream = await client.open({"egressd-account": "acme", ":authority": "example.com:443"})
        assert stream.response_headers["egressd-peer"] == "lax"
        await stream.write(b"hello over the backbone")
        await stream.write_eof()
        assert await read_all(stream) == b"hello over the backbone"
    [(headers, peer)] = seen
    assert headers[":protocol"] == "egressd-tcp"
    assert headers[":authority"] == "example.com:443"
    assert headers["egressd-account"] == "acme"
    assert peer == PeerIdentity("lax", (SERVER_NAME, "127.0.0.1"))


async def test_device_certificate_identity(pki: Pki) -> None:
    peers: list[PeerIdentity] = []

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        peers.append(peer)
        await stream.accept()

    context = client_context(pki.device.cert, pki.device.key, pki.ca)
    async with (
        running(pki, handler) as server,
        dialing(server, context) as client,
        await client.open({}),
    ):
        pass
    assert peers == [PeerIdentity("device-1", ())]


async def test_half_close_in_both_directions(pki: Pki) -> None:
    async def server_closes_first(stream: MuxStream, peer: PeerIdentity) -> None:
        await stream.accept()
        await stream.write(b"banner")
        await stream.write_eof()  # our direction is done; theirs is still open
        assert await read_all(stream) == b"request after the server's EOF"

    async def client_closes_first(stream: MuxStream, peer: PeerIdentity) -> None:
        await stream.accept()
        received = await read_all(stream)  # the client has half-closed
        await stream.write(b"reply to " + received)
        await stream.write_eof()

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        if stream.headers["mode"] == "server-first":
            await server_closes_first(stream, peer)
        else:
            await client_closes_first(stream, peer)

    async with running(pki, handler) as server, dialing(server, pop_client_context(pki)) as client:
        stream = await client.open({"mode": "server-first"})
        assert await read_all(stream) == b"banner"
        await stream.write(b"request after the server's EOF")
        await stream.write_eof()

        stream = await client.open({"mode": "client-first"})
        await stream.write(b"question")
        await stream.write_eof()
        assert await read_all(stream) == b"reply to question"


async def test_1000_concurrent_flows_share_one_connection(pki: Pki) -> None:
    flows = 1000
    arrived = 0
    all_open = asyncio.Event()

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == flows:
            all_open.set()
        await stream.accept()
        await all_open.wait()  # no flow finishes before all 1,000 are open at once
        await echo_accepted(stream)

    async def one(client: MuxClient, index: int) -> bool:
        payload = f"flow {index:04d} ".encode() * (index % 50 + 1)
        async with await client.open({"egressd-flow": str(index)}) as stream:
            await stream.write(payload)
            await stream.write_eof()
            return await read_all(stream) == payload

    async with running(pki, handler) as server, dialing(server, pop_client_context(pki)) as client:
        started = time.monotonic()
        async with asyncio.timeout(45):
            results = await asyncio.gather(*(one(client, i) for i in range(flows)))
        elapsed = time.monotonic() - started
        assert all(results)
        assert server.connections_accepted == 1
        assert client.connections_made == 1
        # Finished flows leave no state behind on either side.
        assert client.open_streams == 0
        await eventually(lambda: server.open_streams == 0)
    print(f"{flows} concurrent flows over one connection in {elapsed:.2f} s")


async def test_a_stopped_reader_blocks_its_writer_but_not_other_streams(pki: Pki) -> None:
    release = asyncio.Event()

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        if stream.headers["kind"] == "slow":
            await stream.accept()
            await release.wait()
            await read_all(stream)
        else:
            await echo(stream, peer)

    chunk = 256 * 1024

    async def writer(stream: MuxStream, written: list[int]) -> None:
        for _ in range(8):  # 2 MiB: twice the stream window
            await stream.write(b"s" * chunk)
            written.append(chunk)

    async with running(pki, handler) as server, dialing(server, pop_client_context(pki)) as client:
        # 20 stalled streams of 1 MiB windows: more than the 16 MiB connection window.
        slow = [await client.open({"kind": "slow"}) for _ in range(20)]
        written: list[list[int]] = [[] for _ in slow]
        writers = [asyncio.ensure_future(writer(s, w)) for s, w in zip(slow, written, strict=True)]
        await eventually(lambda: all(sum(w) == MIB for w in written))
        await asyncio.sleep(0.2)
        # Each writer waits after exactly one stream window; the connection is not stuck.
        assert [sum(w) for w in written] == [MIB] * 20
        assert not any(task.done() for task in writers)
        assert all(stream.send_window == 0 for stream in slow)
        fast = await client.open({"kind": "echo"})
        async with asyncio.timeout(5):
            reader = asyncio.ensure_future(read_all(fast))
            await fast.write(b"x" * 3 * MIB)
            await fast.write_eof()
            assert len(await reader) == 3 * MIB
        release.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*writers)
            for stream in slow:
                await stream.write_eof()


async def test_refused_stream_carries_status_and_reason(pki: Pki) -> None:
    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        if stream.headers.get("egressd-source") == "203.0.113.7":
            await stream.refuse(403, "address 203.0.113.7 is not dedicated to account acme")
        # otherwise: return without answering

    async with running(pki, handler) as server, dialing(server, pop_client_context(pki)) as client:
        with pytest.raises(StreamRefused) as refused:
            await client.open({"egressd-source": "203.0.113.7"})
        assert refused.value.status == 403
        assert refused.value.reason == "address 203.0.113.7 is not dedicated to account acme"
        with pytest.raises(StreamRefused) as unanswered:
            await client.open({})
        assert unanswered.value.status == 500
        # The link survives refusals.
        assert client.connected
        assert await client.ping() > 0


def _no_certificate_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=pki.ca)
    context.set_alpn_protocols(["h2"])
    return context


@pytest.mark.parametrize("case", ["no client certificate", "client from another CA"])
async def test_bad_client_certificates_are_refused_at_the_handshake(pki: Pki, case: str) -> None:
    calls: list[PeerIdentity] = []

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        calls.append(peer)
        await echo(stream, peer)

    if case == "no client certificate":
        context = _no_certificate_context(pki)
    else:
        context = client_context(pki.foreign_pop.cert, pki.foreign_pop.key, pki.ca)
    async with running(pki, handler) as server, dialing(server, context) as client:
        with pytest.raises(MuxError):
            await client.open({})
        assert not client.connected
        assert server.connections_accepted == 0
    assert calls == []


async def test_a_server_from_another_ca_is_refused_at_the_handshake(pki: Pki) -> None:
    calls: list[PeerIdentity] = []

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        calls.append(peer)

    foreign = server_context(pki.foreign_pop.cert, pki.foreign_pop.key, pki.foreign_ca)
    server = MuxServer(foreign, handler)
    await server.start()
    try:
        async with dialing(server, pop_client_context(pki)) as client:
            with pytest.raises(MuxError, match="certificate verify failed"):
                await client.open({})
            with pytest.raises(MuxError):
                await client.ping()
    finally:
        await server.close()
    assert calls == []
    assert server.connections_accepted == 0


async def test_link_loss_fails_open_streams_and_the_next_open_reconnects(pki: Pki) -> None:
    async with running(pki, echo) as server:
        port = server.address[1]
        client = MuxClient("127.0.0.1", port, pop_client_context(pki), server_hostname=SERVER_NAME)
        streams = [await client.open({}) for _ in range(3)]
        await streams[0].write(b"before")
        assert await streams[0].read() == b"before"
        reading = asyncio.ensure_future(streams[1].read())
        await asyncio.sleep(0.05)
    # The server is closed: every open stream fails, reads and writes alike.
    with pytest.raises(MuxError):
        await asyncio.wait_for(reading, 5)
    with pytest.raises(MuxError):
        await streams[0].read()
    with pytest.raises(MuxError):
        await streams[2].write(b"after")
    assert not client.connected
    with pytest.raises(MuxError):  # nobody listens now
        await client.open({})
    async with running(pki, echo, port=port):
        stream = await client.open({})
        await stream.write(b"again")
        assert await stream.read() == b"again"
        assert client.connected
        assert client.connections_made == 2
    await client.close()


async def test_ping_measures_a_positive_rtt(pki: Pki) -> None:
    async with running(pki, echo) as server, dialing(server, pop_client_context(pki)) as client:
        rtts = [await client.ping() for _ in range(5)]
        assert all(0 < rtt < 1 for rtt in rtts)
        assert client.connected


async def test_datagram_stream_round_trip(pki: Pki) -> None:
    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        await stream.accept()
        datagrams = DatagramStream(stream)
        with contextlib.suppress(EOFError):
            while True:
                payload = await datagrams.recv()
                await datagrams.send(payload[::-1])
        await datagrams.close()

    payloads = [b"", b"q", bytes(range(256)) * 5 + b"!" * 120, b"\x00" * 1400, b"", b"end"]
    async with running(pki, handler) as server, dialing(server, pop_client_context(pki)) as client:
        stream = await client.open({":authority": "198.51.100.9:443"}, protocol="connect-udp")
        datagrams = DatagramStream(stream)
        for payload in payloads:
            await datagrams.send(payload)
        got = [await datagrams.recv() for _ in payloads]
        assert got == [payload[::-1] for payload in payloads]
        assert len(got[3]) == 1400
        await datagrams.close()
        with pytest.raises(EOFError):
            await datagrams.recv()


@contextlib.asynccontextmanager
async def tcp_echo_server() -> AsyncIterator[tuple[str, int]]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()  # half-close: echo everything, then EOF
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()


async def test_pump_relays_to_a_real_tcp_echo_server_with_half_close(pki: Pki) -> None:
    results: list[tuple[int, int] | BaseException] = []

    async with tcp_echo_server() as (host, port):

        async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            await stream.accept()
            try:
                results.append(await pump(stream, sock))
            except PumpError as error:
                results.append(error)
            finally:
                sock.close()

        payload = bytes(range(256)) * 8 * 1024  # 2 MiB
        async with (
            running(pki, handler) as server,
            dialing(server, pop_client_context(pki)) as client,
        ):
            stream = await client.open({":authority": f"{host}:{port}"})
            reader = asyncio.ensure_future(read_all(stream))  # read while writing
            await stream.write(payload)
            await stream.write_eof()
            assert await asyncio.wait_for(reader, 10) == payload

            # A flow the device aborts: the PoP's pump reports where it broke.
            stream = await client.open({":authority": f"{host}:{port}"})
            await stream.write(b"partial")
            assert await stream.read() == b"partial"
            stream.reset()
            await eventually(lambda: len(results) == 2)
    assert results[0] == (len(payload), len(payload))
    error = results[1]
    assert isinstance(error, PumpError)
    assert error.side is Side.STREAM
    assert isinstance(error.__cause__, StreamReset)
    assert (error.to_socket, error.to_stream) == (7, 7)


async def test_opens_beyond_the_peers_stream_limit_wait_for_a_free_slot(pki: Pki) -> None:
    active = peak = 0

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.01)
            await echo(stream, peer)
        finally:
            active -= 1

    async def one(client: MuxClient, index: int) -> bytes:
        async with await client.open({}) as stream:
            await stream.write(b"%d" % index)
            await stream.write_eof()
            return await read_all(stream)

    context = server_context(pki.pop.cert, pki.pop.key, pki.ca)
    server = MuxServer(context, handler, settings=LinkSettings(max_concurrent_streams=5))
    await server.start()
    try:
        async with dialing(server, pop_client_context(pki)) as client:
            async with asyncio.timeout(10):
                results = await asyncio.gather(*(one(client, i) for i in range(40)))
            assert results == [b"%d" % i for i in range(40)]
    finally:
        await server.close()
    assert peak <= 5


async def test_concurrent_opens_to_an_unreachable_peer_share_one_failed_attempt() -> None:
    with socket.socket() as placeholder:  # a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    client = MuxClient("127.0.0.1", port, ssl.create_default_context(), server_hostname="x")
    async with asyncio.timeout(5):
        results = await asyncio.gather(
            *(client.open({}) for _ in range(50)), return_exceptions=True
        )
    assert all(isinstance(result, MuxError) for result in results)
    assert "cannot connect" in str(results[0])
    with pytest.raises(ValueError, match="invalid header"):
        await client.open({"egressd-account": "acme\r\nevil: 1"})
    await client.close()


async def test_opens_waiting_on_a_connect_that_close_abandons_fail_as_mux_errors() -> None:
    """`close` during a connect (the backbone drops a peer it found down): the flows that
    wait on that connect fail like any failed connect, so the PoP answers them with a 502
    instead of closing them unanswered; a waiting open that is itself cancelled stays so."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never speaks TLS
        client = MuxClient(*silent.getsockname()[:2], ssl.create_default_context(),
                           server_hostname="x", connect_timeout=5)
        waiting = [asyncio.create_task(client.open({})) for _ in range(3)]
        await asyncio.sleep(0.2)  # all three wait on the one TLS handshake
        assert not any(task.done() for task in waiting)
        waiting[2].cancel()
        await client.close()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(results[0], MuxError) and "abandoned" in str(results[0])
    assert isinstance(results[1], MuxError)
    assert isinstance(results[2], asyncio.CancelledError)


async def test_close_cancels_handlers_that_outlive_the_grace_period(pki: Pki) -> None:
    cancelled = asyncio.Event()

    async def stubborn(stream: MuxStream, peer: PeerIdentity) -> None:
        await stream.accept()
        try:
            await asyncio.sleep(3600)  # ignores its stream
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = MuxServer(server_context(pki.pop.cert, pki.pop.key, pki.ca), stubborn)
    await server.start()
    async with dialing(server, pop_client_context(pki)) as client:
        stream = await client.open({})
        started = time.monotonic()
        await server.close(grace=0.2)
        assert time.monotonic() - started < 3
        assert cancelled.is_set()
        with pytest.raises(MuxError):
            await stream.read()


async def test_pump_ends_at_once_when_the_peer_aborts_while_the_socket_is_silent(pki: Pki) -> None:
    """The upstream neither answers nor closes: only the stream's reset can end the relay."""
    outcome: asyncio.Future[BaseException | tuple[int, int]] = asyncio.Future()

    test_over = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # swallow everything up to EOF, say nothing, keep the socket open
        await test_over.wait()
        writer.close()

    upstream = await asyncio.start_server(silent, "127.0.0.1", 0)
    host, port = upstream.sockets[0].getsockname()[:2]

    async def handler(stream: MuxStream, peer: PeerIdentity) -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            await stream.accept()
            try:
                outcome.set_result(await pump(stream, sock))
            except PumpError as error:
                outcome.set_result(error)

    try:
        async with (
            running(pki, handler) as server,
            dialing(server, pop_client_context(pki)) as client,
        ):
            stream = await client.open({})
            await stream.write(b"request")
            await stream.write_eof()  # the relay's stream->socket direction is done
            await asyncio.sleep(0.1)
            stream.reset()
            error = await asyncio.wait_for(outcome, 2)
    finally:
        test_over.set()
        upstream.close()
        await upstream.wait_closed()
    assert isinstance(error, PumpError)
    assert error.side is Side.STREAM
    assert (error.to_socket, error.to_stream) == (7, 0)
