"""Fixtures of the client tests: `egressd serve` in-process (control plane, three PoPs with
device links, echo), `egressd` commands as real child processes, and enrolled devices."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from egressd.serve import ServeSettings, ServeStack

CLI_TIMEOUT = 30.0


def egressd_command() -> list[str]:
    script = shutil.which("egressd")
    return [script] if script else [sys.executable, "-c", "from egressd.cli import main; main()"]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


@dataclass
class Result:
    code: int
    out: str
    err: str


async def cli(*args: str, within: float = CLI_TIMEOUT) -> Result:
    """Run `egressd ARGS` to the end (without blocking the loop the gateway runs on)."""
    process = await asyncio.create_subprocess_exec(
        *egressd_command(), *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env())
    try:
        async with asyncio.timeout(within):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return Result(process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    stack = ServeStack(ServeSettings(state_dir=tmp_path / "state", port_base=0))
    info = await stack.start()
    info["stack"] = stack
    try:
        yield info
    finally:
        await stack.close()
    # Closing the stack ends everything it started, device links included.
    current = asyncio.current_task()
    deadline = time.monotonic() + 3
    while True:
        leftover = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
        if not leftover or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert not leftover, f"tasks left after ServeStack.close(): {leftover}"


def admin(info: dict[str, Any]) -> httpx.AsyncClient:
    token = Path(info["control"]["admin_token"]).read_text().strip()
    return httpx.AsyncClient(base_url=info["control"]["url"],
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)


async def enrollment_token(info: dict[str, Any], account: str, user: str) -> str:
    async with admin(info) as api:
        response = await api.post(f"/v1/accounts/{account}/enrollment-tokens", json={"user": user})
        assert response.status_code == 201, response.text
        return str(response.json()["token"])


Enroll = Callable[..., Awaitable[Path]]


def device_id(state: Path) -> str:
    return str(json.loads((state / "device.json").read_text())["device_id"])


async def known_to_every_pop(serve: dict[str, Any], state: Path, within: float = 5.0) -> None:
    """An enrolled device is a new snapshot version: wait until every PoP runs it (R14)."""
    device = device_id(state)
    stack: ServeStack = serve["stack"]
    deadline = time.monotonic() + within
    while any(device not in pop.runtime.state.snapshot.devices for pop in stack.pops.values()):
        assert time.monotonic() < deadline, f"the PoPs did not learn of {device} in {within} s"
        await asyncio.sleep(0.05)


@pytest.fixture
def enroll(serve: dict[str, Any], tmp_path: Path) -> Enroll:
    """Enroll a device of `account` with `egressd client enroll`; its state directory."""

    made: list[Path] = []

    async def enroll_device(account: str, *extra: str) -> Path:
        user = {"acme": "alice", "globex": "carol"}[account]
        state = tmp_path / f"client-{account}-{len(made)}"
        made.append(state)
        token = await enrollment_token(serve, account, user)
        result = await cli("client", "enroll", "--control", serve["control"]["url"],
                           "--token", token, "--state-dir", str(state), "--serve-json",
                           str(Path(serve["flow_log"]).parent / "serve.json"), *extra)
        assert result.code == 0, result.err
        await known_to_every_pop(serve, state)
        return state

    return enroll_device


@dataclass
class Child:
    process: asyncio.subprocess.Process
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


Spawn = Callable[..., Awaitable[Child]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start long-running `egressd ARGS` children; all are stopped at the end."""
    children: list[Child] = []

    async def start(*args: str) -> Child:
        stderr_path = tmp_path / f"child-{len(children)}.stderr"
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *egressd_command(), *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr, env=clean_env(),
                start_new_session=True)
        child = Child(process, stderr_path)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            await child.stop()


async def client_status(state: Path, child: Child, within: float = 20.0) -> dict[str, Any]:
    """The running client's status.json, once it has written one."""
    deadline = time.monotonic() + within
    path = state / "status.json"
    while time.monotonic() < deadline:
        assert child.process.returncode is None, child.stderr()
        with contextlib.suppress(OSError, ValueError):
            status: dict[str, Any] = json.loads(path.read_text())
            if status.get("connected_pop"):
                # A status naming port 0 would send the test (and a user) nowhere.
                assert not str(status["listen"]).endswith(":0"), status
                return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"the client wrote no status: {child.stderr()}")


async def start_client(spawn: Spawn, state: Path, *extra: str) -> tuple[Child, dict[str, Any]]:
    child = await spawn("client", "run", "--state-dir", str(state), "--listen", "127.0.0.1:0",
                        *extra)
    return child, await client_status(state, child)
