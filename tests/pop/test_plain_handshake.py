"""The plain listener's callback handshake (`pop/plain_handshake.py`): CONNECT and SOCKS5
CONNECT to an address literal need no task, anything that must await gets one, and the
answers are those of the coroutine path. Real sockets on 127.0.0.1, both event loops."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from tests.pop.test_http_forward import ANN, DEPLOYMENT, TIMEOUT, Origin, Pop, Run, run, settle

from egressd.model.deployment import load_deployment
from egressd.pop import deadlines
from egressd.pop.admission import AdmissionLimits
from egressd.pop.runtime import PopOptions
from egressd.protocols.http1 import RequestHeadReader, ResponseHeadReader

__all__ = ["run"]


def count_spawns(pop: Pop) -> list[str]:
    """Record the coroutines the handshake hands to the listener as tasks."""
    spawned: list[str] = []
    spawn = pop.listener.spawn

    def counting(coro: Coroutine[Any, Any, None], *owned: socket.socket) -> None:
        spawned.append(coro.__qualname__)
        spawn(coro, *owned)

    pop.listener.spawn = counting  # type: ignore[method-assign]
    return spawned


async def connect_tunnel(pop: Pop, authority: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection(*pop.address)
    token = base64.b64encode(f"{ANN[0]}:{ANN[1]}".encode()).decode()
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                 f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
    heads = ResponseHeadReader("CONNECT")
    async with asyncio.timeout(TIMEOUT):
        while (head := heads.next_head()) is None:
            data = await reader.read(65536)
            assert data, "the PoP closed the connection with no answer"
            heads.feed(data)
    return reader, writer, head.status


async def who_through(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: Origin) -> int:
    """GET /who through an established tunnel: the origin answers with the source port."""
    writer.write(f"GET /who HTTP/1.1\r\nHost: {origin.address[0]}\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        answer = await reader.read()
    return int(answer.split(b"\r\n\r\n", 1)[1])


def test_connect_to_an_address_literal_needs_no_task(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        spawned = count_spawns(pop)
        reader, writer, status = await connect_tunnel(pop, f"{origin.address[0]}:{origin.address[1]}")
        assert status == 200
        port = await who_through(reader, writer, origin)
        writer.close()
        assert await settle(lambda: len(pop.runtime.relays) == 0 and bool(pop.records()))
        assert spawned == []
        (record,) = pop.records()
        assert record["outcome"] == "ok" and record["source"] == f"127.0.0.2:{port}"
        assert record["destination"] == "127.0.0.1" and record["account"] == "alpha"
    run(body)


def test_socks5_connect_to_an_address_literal_needs_no_task(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        spawned = count_spawns(pop)
        reader, writer = await asyncio.open_connection(*pop.address)
        user, password = (part.encode() for part in ANN)
        writer.write(b"\x05\x01\x02" + bytes([1, len(user)]) + user + bytes([len(password)]) + password
                     + b"\x05\x01\x00\x01" + socket.inet_aton(origin.address[0])
                     + struct.pack("!H", origin.address[1]))
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(4) == b"\x05\x02\x01\x00"
            reply = await reader.readexactly(10)
        assert reply[:4] == b"\x05\x00\x00\x01" and socket.inet_ntoa(reply[4:8]) == "127.0.0.2"
        port = await who_through(reader, writer, origin)
        assert port == struct.unpack("!H", reply[8:10])[0]
        writer.close()
        assert await settle(lambda: len(pop.runtime.relays) == 0 and bool(pop.records()))
        assert spawned == []
        assert [record["outcome"] for record in pop.records()] == ["ok"]
    run(body)


def test_refused_connect_is_answered_from_the_handshake(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        spawned = count_spawns(pop)
        _reader, writer, status = await connect_tunnel(pop, "127.0.0.3:80")
        assert status == 403
        writer.close()
        assert spawned == [] and not pop.listener.handshakes
        assert [record["outcome"] for record in pop.records()] == ["refused"]
    run(body)


def test_connect_to_a_name_awaits_in_a_task_of_the_listener(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        spawned = count_spawns(pop)
        reader, writer, status = await connect_tunnel(pop, f"localhost:{origin.address[1]}")
        assert status == 200
        await who_through(reader, writer, origin)
        writer.close()
        assert spawned == ["PlainHandshake._open_tcp"]
        assert await settle(lambda: not pop.listener.tasks and len(pop.runtime.relays) == 0)
    run(body)


def test_accepted_connections_have_nodelay_and_are_non_blocking(run: Run) -> None:
    """The listener sets TCP_NODELAY once, for the connections it accepts to inherit, and
    makes each socket from the accepted descriptor itself: both checked on a handshake."""
    async def body(pop: Pop, origin: Origin) -> None:
        _reader, writer = await asyncio.open_connection(*pop.address)
        writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")  # half a head: the handshake waits
        assert await settle(lambda: len(pop.listener.handshakes) == 1)
        (handshake,) = pop.listener.handshakes
        sock = handshake.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getblocking() is False and sock.family == socket.AF_INET
        assert handshake.peer == writer.get_extra_info("sockname")[:2]
        writer.close()
    run(body)


def test_a_repeated_connect_head_is_read_once_and_still_authenticated(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CONNECT head that was the whole first read is remembered: the same bytes again go
    on without a reader, still checked against the credentials in force."""
    readers: list[int] = []
    make = PopOptions.head_reader

    def counting(self: PopOptions) -> RequestHeadReader:
        readers.append(1)
        return make(self)

    monkeypatch.setattr(PopOptions, "head_reader", counting)  # the PoP's readers, no others

    async def body(pop: Pop, origin: Origin) -> None:
        authority = f"{origin.address[0]}:{origin.address[1]}"
        for _ in range(3):
            reader, writer, status = await connect_tunnel(pop, authority)
            assert status == 200
            await who_through(reader, writer, origin)
            writer.close()
        assert len(readers) == 1
        assert await settle(lambda: len(pop.records()) == 3)
        records = pop.records()
        assert [record["outcome"] for record in records] == ["ok"] * 3
        # The remembered head makes the same flow record as the read one.
        for record in records:
            assert record["account"] == "alpha" and record["destination"] == "127.0.0.1"
            assert record["source"].startswith("127.0.0.2:") and record["rule"] == records[0]["rule"]
        # Other bytes (another password) are read again, and refused.
        reader, writer = await asyncio.open_connection(*pop.address)
        token = base64.b64encode(f"{ANN[0]}:wrong".encode()).decode()
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                     f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read(65536)
        assert answer.startswith(b"HTTP/1.1 407") and len(readers) == 2
        writer.close()
    run(body)


def test_a_connect_that_hangs_gets_504_after_the_connect_timeout(run: Run) -> None:
    """A real hanging connect: a listener whose accept queue is full drops further SYNs.
    The handshake's connect timeout (one of the runtime's `Deadlines`) answers 504."""
    async def body(pop: Pop, origin: Origin) -> None:
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        held = []
        try:
            for _ in range(4):  # fill the accept queue: it is never accepted from
                queued = socket.socket()
                queued.setblocking(False)
                queued.connect_ex(full.getsockname())
                held.append(queued)
            await asyncio.sleep(0.1)
            started = time.monotonic()
            _reader, writer, status = await connect_tunnel(pop, f"127.0.0.1:{full.getsockname()[1]}")
            waited = time.monotonic() - started
            assert status == 504
            assert 0.3 <= waited < 0.3 + deadlines.LATE_BY + 1.0
            writer.close()
            assert await settle(lambda: bool(pop.records()))
            (record,) = pop.records()
            assert record["outcome"] == "upstream-error" and "timed out" in record["error"]
            assert not pop.listener.handshakes and len(pop.runtime.relays) == 0
        finally:
            for sock in (*held, full):
                sock.close()
    run(body, connect_timeout=0.3)


def test_the_listener_waits_in_the_pops_poller_and_leaves_it_when_it_stops(run: Run) -> None:
    """One epoll set for the listener, the handshakes and the relays; none of it left behind."""
    async def body(pop: Pop, origin: Origin) -> None:
        poller = pop.runtime.poller
        assert len(poller) == 1  # the listening socket
        reader, writer, status = await connect_tunnel(pop, f"{origin.address[0]}:{origin.address[1]}")
        assert status == 200
        assert len(poller) == 3  # and the tunnel's two sockets
        await who_through(reader, writer, origin)
        writer.close()
        assert await settle(lambda: len(poller) == 1)
        pop.listener.stop_accepting()
        assert len(poller) == 0
    run(body)


def test_a_request_read_whole_at_once_sets_no_handshake_timer(run: Run) -> None:
    """The handshake timeout guards requests still being read; a CONNECT that came whole
    with the connection never needs one (and a timer per tunnel costs)."""
    async def body(pop: Pop, origin: Origin) -> None:
        added: list[float] = []
        add = deadlines.Deadlines.add

        def counting(self: deadlines.Deadlines, duration: float, callback: Any) -> Any:
            added.append(duration)
            return add(self, duration, callback)

        patch = pytest.MonkeyPatch()
        patch.setattr(deadlines.Deadlines, "add", counting)
        token = base64.b64encode(f"{ANN[0]}:{ANN[1]}".encode()).decode()
        authority = f"{origin.address[0]}:{origin.address[1]}"
        # The PoP accepts only once the request is there: whole at the first read.
        poller, listening = pop.runtime.poller, pop.listener.sock
        assert listening is not None
        poller.remove_reader(listening.fileno())
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(pop.address)
        await asyncio.sleep(0.05)
        sock.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                  f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
        await asyncio.sleep(0.05)
        poller.add_reader(listening.fileno(), pop.listener._on_acceptable)
        reader, writer = await asyncio.open_connection(sock=sock)
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        patch.undo()
        assert added == []  # nor a connect timer: a connect on this host is done at once
        writer.close()
    run(body, handshake_timeout=3.0, connect_timeout=7.0)


def test_a_repeated_connect_is_planned_once_and_each_tunnel_still_has_its_record(run: Run) -> None:
    """The plan of a connect to a literal (address and decision) is remembered for the
    snapshot in force, and the record of a planned tunnel is made after the 200: each
    tunnel still gets a whole record, and gives its flow slot back."""
    async def body(pop: Pop, origin: Origin) -> None:
        runtime = pop.runtime
        decided: list[object] = []
        decide_for = runtime.decide_for

        def counting(*args: Any) -> Any:
            decided.append(args)
            return decide_for(*args)

        runtime.decide_for = counting  # type: ignore[method-assign]
        ports = []
        for turn in range(4):
            if turn == 3:  # a new snapshot: plans are made anew
                runtime.state.replace(load_deployment(DEPLOYMENT))
            reader, writer, status = await connect_tunnel(pop, f"{origin.address[0]}:{origin.address[1]}")
            assert status == 200
            ports.append(await who_through(reader, writer, origin))
            writer.close()
            ended = turn + 1
            assert await settle(lambda: len(runtime.relays) == 0 and len(pop.records()) == ended)  # noqa: B023
        assert len(decided) == 2  # the first tunnel, and the first after the new snapshot
        records = pop.records()
        assert len({record["flow_id"] for record in records}) == 4
        for record, port in zip(records, ports, strict=True):
            assert record["outcome"] == "ok" and record["source"] == f"127.0.0.2:{port}"
            assert record["destination"] == "127.0.0.1" and record["port"] == origin.address[1]
            assert record["account"] == "alpha" and record["egress"] and record["rule"]
            assert record["duration_ms"] >= 0
        assert runtime.flows_per_source["127.0.0.1"] == 0 and runtime.flows_per_account["alpha"] == 0
    run(body)


def test_a_planned_connect_past_the_flow_cap_is_429_and_frees_nothing_it_did_not_take(run: Run) -> None:
    async def body(pop: Pop, origin: Origin) -> None:
        runtime, target = pop.runtime, f"{origin.address[0]}:{origin.address[1]}"
        held_reader, held_writer, status = await connect_tunnel(pop, target)
        assert status == 200
        for _ in range(2):  # planned, then refused by the cap
            _reader, writer, status = await connect_tunnel(pop, target)
            assert status == 429
            writer.close()
        assert runtime.flows_per_source["127.0.0.1"] == 1
        await who_through(held_reader, held_writer, origin)
        held_writer.close()
        assert await settle(lambda: len(runtime.relays) == 0 and runtime.flows_per_source["127.0.0.1"] == 0)
        reader, writer, status = await connect_tunnel(pop, target)  # the slot is free again
        assert status == 200
        await who_through(reader, writer, origin)
        writer.close()
        assert await settle(lambda: len(pop.records()) == 4)
        assert [record["outcome"] for record in pop.records()] == ["upstream-error", "upstream-error", "ok", "ok"]
    run(body, limits=AdmissionLimits(max_flows_per_source=1))


def test_a_planned_tunnels_record_begins_at_its_connect(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is made after the 200, but its start (and so its duration) is the connect's."""
    from egressd.pop import plain_handshake

    real = plain_handshake.start_connect

    def slow(*args: Any) -> Any:
        time.sleep(0.05)  # a connect that takes 50 ms
        return real(*args)

    monkeypatch.setattr(plain_handshake, "start_connect", slow)

    async def body(pop: Pop, origin: Origin) -> None:
        reader, writer, status = await connect_tunnel(pop, f"{origin.address[0]}:{origin.address[1]}")
        assert status == 200
        await who_through(reader, writer, origin)
        writer.close()
        assert await settle(lambda: bool(pop.records()))
        (record,) = pop.records()
        assert record["outcome"] == "ok" and record["duration_ms"] >= 50
    run(body)


def test_a_planned_connect_that_fails_by_a_bug_gives_its_flow_slot_back(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot taken for a planned connect, whose record was never made (a bug between the
    two costs the connection), is released when the handshake closes."""
    from egressd.pop import plain_handshake

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the connect")

    monkeypatch.setattr(plain_handshake, "start_connect", broken)

    async def body(pop: Pop, origin: Origin) -> None:
        reader, writer = await asyncio.open_connection(*pop.address)
        token = base64.b64encode(f"{ANN[0]}:{ANN[1]}".encode()).decode()
        authority = f"{origin.address[0]}:{origin.address[1]}"
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                     f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""  # closed, with nothing proxied
        writer.close()
        assert pop.runtime.flows_per_source["127.0.0.1"] == 0
        assert pop.runtime.flows_per_account["alpha"] == 0
    run(body)


def test_a_planned_connect_takes_the_spare_the_last_one_made_and_a_new_snapshot_drops_it(run: Run) -> None:
    """The upstream socket is made ahead, after the previous tunnel's reply (off the next
    one's path): the next tunnel from that source connects it. A new snapshot may take
    the address away: its first planned connect closes the spares."""
    async def body(pop: Pop, origin: Origin) -> None:
        runtime, target = pop.runtime, f"{origin.address[0]}:{origin.address[1]}"
        reader, writer, status = await connect_tunnel(pop, target)
        assert status == 200
        (made,) = (spare for spare, _, _ in runtime.spares._spares.values())
        assert made.getsockname() == ("127.0.0.2", 0)
        await who_through(reader, writer, origin)
        writer.close()
        reader, writer, status = await connect_tunnel(pop, target)  # takes it, makes the next
        assert status == 200
        port = await who_through(reader, writer, origin)
        writer.close()
        assert await settle(lambda: len(runtime.relays) == 0 and len(pop.records()) == 2)
        assert pop.records()[1]["source"] == f"127.0.0.2:{port}"
        assert made.fileno() == -1  # the second tunnel's upstream, closed with it
        (left,) = (spare for spare, _, _ in runtime.spares._spares.values())
        runtime.state.replace(load_deployment(DEPLOYMENT))
        reader, writer, status = await connect_tunnel(pop, target)
        assert status == 200 and left.fileno() == -1  # closed by the new snapshot, not used
        await who_through(reader, writer, origin)
        writer.close()
        assert await settle(lambda: len(runtime.relays) == 0 and len(pop.records()) == 3)
        assert [record["outcome"] for record in pop.records()] == ["ok"] * 3
    run(body)


def test_a_bug_while_connecting_is_answered_502_and_logged(
        run: Run, caplog: pytest.LogCaptureFixture) -> None:
    """Anything but a refusal or an upstream error out of the awaited connect (a bug, or an
    error a layer forgot to map): the client gets a 502 and the flow its record, not a
    connection closed with no answer."""
    async def body(pop: Pop, origin: Origin) -> None:
        async def broken(*args: Any) -> Any:
            raise RuntimeError("a bug in the connect")

        pop.runtime.open_tcp = broken  # type: ignore[method-assign]
        _reader, writer, status = await connect_tunnel(pop, f"localhost:{origin.address[1]}")
        writer.close()
        assert status == 502
        assert await settle(lambda: bool(pop.records()) and not pop.listener.tasks)
        (record,) = pop.records()
        assert record["outcome"] == "upstream-error" and record["error"] == "internal error"
        assert "unexpected error connecting localhost" in caplog.text
        assert pop.runtime.flows_per_source["127.0.0.1"] == 0
    run(body)
