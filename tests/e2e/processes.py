"""`egressd` commands as real child processes: start, readiness, signals, cleanup; and a
one-PoP deployment on loopback for `egressd pop` (leaves from 127.0.0.2, may reach 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egressd.pop.identity import hash_secret

from .helpers import IO_TIMEOUT, close_writer, open_tcp, read_response, reserve_port, settle


def egressd_command() -> list[str]:
    """The installed `egressd` script, or the same entry point through this interpreter."""
    script = shutil.which("egressd")
    if script is not None:
        return [script]
    return [sys.executable, "-c", "from egressd.cli import main; main()"]


def clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


@dataclass
class EgressdProcess:
    """One `egressd ...` child in its own session (so its workers can be cleaned up too)."""

    process: asyncio.subprocess.Process
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, within: float) -> int:
        async with asyncio.timeout(within):
            return await self.process.wait()

    def _processes(self, field: int) -> list[int]:
        """Pids whose /proc stat `field` (1: parent pid, 2: process group) is our child's pid."""
        found: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[field]) == self.pid:
                    found.append(int(entry))
        return sorted(found)

    def workers(self) -> list[int]:
        """Pids of the direct children (the worker processes of `egressd pop --workers N`)."""
        return self._processes(1)

    def catches(self, *signums: int, pid: int | None = None) -> bool:
        """Whether the process has handlers installed for every one of `signums`."""
        try:
            status = Path(f"/proc/{pid or self.pid}/status").read_text()
        except OSError:
            return False
        caught = int(status.split("SigCgt:", 1)[1].split()[0], 16)
        return all(caught & (1 << (signum - 1)) for signum in signums)

    async def wait_ready(self, workers: int = 1, within: float = 20.0) -> None:
        """Until the process (and each of its `workers`, if forked) handles SIGTERM and SIGHUP:
        a signal sent earlier would meet the default action and kill it."""
        wanted = (signal.SIGTERM, signal.SIGHUP)

        def ready() -> bool:
            children = self.workers() if workers > 1 else []
            if workers > 1 and len(children) != workers:
                return False
            return all(self.catches(*wanted, pid=pid) for pid in [self.pid, *children])

        assert await settle(ready, within), f"not ready for signals: {self.stderr()}"

    async def stop(self) -> None:
        """End the child and its session if still running: SIGTERM, then SIGKILL."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await self.wait(10.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        for pid in self._processes(2):  # workers left behind in our child's process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


Start = Callable[..., Awaitable[EgressdProcess]]


def output_file(path: Path) -> int:
    """A new file for a child's output, as a descriptor (close it once the child has it)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


async def wait_healthy(address: tuple[str, int], within: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        try:
            reader, writer = await open_tcp(address)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: pop\r\nConnection: close\r\n\r\n")
            response = await read_response(reader)
        finally:
            await close_writer(writer)
        assert response.status == 200
        return dict(json.loads(response.body))


SECRET = "tess-first-secret"
NEW_SECRET = "tess-second-secret"
DEVICE = "tess-laptop"


def deployment(secret: str) -> str:
    return f"""
[deployment]
allow_destinations = ["127.0.0.1/32"]

[[data_centers]]
code = "tst"
city = "Loopback"
country = "ZZ"
latitude = 0.0
longitude = 0.0
shared_ipv4 = ["127.0.0.2"]

[[accounts]]
id = "tester"
plan = "free"

  [[accounts.users]]
  name = "tess"

  [[accounts.devices]]
  id = "{DEVICE}"
  user = "tess"
  secret_sha256 = "{hash_secret(secret)}"
"""


def write_atomically(path: Path, text: str) -> None:
    scratch = path.with_suffix(".tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


class PopUnderTest:
    def __init__(self, child: EgressdProcess, address: tuple[str, int], flow_log: Path,
                 deployment_path: Path) -> None:
        self.child = child
        self.address = address
        self.flow_log = flow_log
        self.deployment_path = deployment_path

    async def log_count(self, text: str, count: int, within: float = IO_TIMEOUT) -> None:
        ok = await settle(lambda: self.child.stderr().count(text) >= count, within)
        assert ok, f"{text!r} not logged {count} time(s): {self.child.stderr()}"


async def start_pop(egressd_process: Start, tmp_path: Path, *args: str, workers: int = 1) -> PopUnderTest:
    """`egressd pop` on a reserved port of 127.0.0.1, ready (healthy, handling signals)."""
    deployment_path = tmp_path / "deployment.toml"
    write_atomically(deployment_path, deployment(SECRET))
    flow_log = tmp_path / "flows.jsonl"
    reservation = reserve_port()
    try:
        address = reservation.getsockname()[:2]
        child = await egressd_process([
            "pop", "--deployment", str(deployment_path), "--pop", "tst",
            "--listen", f"{address[0]}:{address[1]}", "--flow-log", str(flow_log),
            "--workers", str(workers), *args,
        ])
        await wait_healthy(address)
        await child.wait_ready(workers=workers)
    finally:
        reservation.close()
    return PopUnderTest(child, address, flow_log, deployment_path)


