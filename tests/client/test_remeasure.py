"""The client re-measures every PoP periodically and moves to one that became clearly
faster. Latency is real: each PoP's device link is reached through a relay in the test
that delays every chunk by a settable one-way delay (loopback has no RTTs of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .conftest import Spawn, cli, enrollment_token, known_to_every_pop, start_client
from .test_client_e2e import curl


class DelayRelay:
    """TCP relay to `target` adding `delay_ms / 2` each way, order kept."""

    def __init__(self, target: tuple[str, int], delay_ms: float) -> None:
        self.target = target
        self.delay_ms = delay_ms
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._direction(reader, up_writer), self._direction(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            up_writer.close()
            self.tasks.discard(task)

    async def _direction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self.delay_ms / 2000, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await delivering


@contextlib.asynccontextmanager
async def relays(serve: dict[str, Any], delays: dict[str, float]) -> AsyncIterator[dict[str, DelayRelay]]:
    made: dict[str, DelayRelay] = {}
    try:
        for code, delay in delays.items():
            host, _, port = serve["pops"][code]["device_link"].removeprefix("https://").rpartition(":")
            made[code] = DelayRelay((host, int(port)), delay)
            await made[code].start()
        yield made
    finally:
        for relay in made.values():
            await relay.close()


async def test_the_client_moves_to_a_pop_that_became_clearly_faster(
        serve: dict[str, Any], spawn: Spawn, tmp_path: Path) -> None:
    async with relays(serve, {"las": 0.0, "lax": 30.0}) as delayed:
        token = await enrollment_token(serve, "globex", "carol")
        state = tmp_path / "client"
        enrolled = await cli("client", "enroll", "--control", serve["control"]["url"], "--token", token,
                             "--state-dir", str(state), "--ca", serve["ca_cert"],
                             f"--pop=las=127.0.0.1:{delayed['las'].port}",
                             f"--pop=lax=127.0.0.1:{delayed['lax'].port}")
        assert enrolled.code == 0, enrolled.err
        await known_to_every_pop(serve, state)
        _child, status = await start_client(spawn, state, "--remeasure", "1")
        assert status["connected_pop"] == "las", status["rtt_ms"]
        assert status["rtt_ms"]["lax"] >= 25
        delayed["las"].delay_ms = 80.0  # las is now much slower than lax
        deadline = time.monotonic() + 6
        current = status
        while time.monotonic() < deadline:
            current = json.loads((await curl(f"http://{status['listen']}/status"))[1])
            if current["connected_pop"] == "lax":
                break
            await asyncio.sleep(0.2)
        assert current["connected_pop"] == "lax", current["rtt_ms"]
        assert current["switches"][-1]["reason"].startswith("faster: ")
        # A PoP a little faster is not worth a move (hysteresis): lax stays.
        delayed["las"].delay_ms = 25.0
        await asyncio.sleep(2.5)
        current = json.loads((await curl(f"http://{status['listen']}/status"))[1])
        assert current["connected_pop"] == "lax", current["rtt_ms"]
        code, body = await curl("-x", f"http://{status['listen']}", serve["echo"]["http"])
        assert code == 0 and body.strip() == "127.0.2.1", body
