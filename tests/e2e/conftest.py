"""Fixtures of the end-to-end tests: the whole gateway in-process (`serve`), and `egressd`
commands run as real subprocesses (`egressd_process`).

`serve` takes ServeSettings overrides by indirect parametrisation:

    @pytest.mark.parametrize("serve", [{"acme_proxy_udp": False}], indirect=True)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from egressd.serve import ServeSettings, ServeStack

from .helpers import settle
from .processes import EgressdProcess, clean_env, egressd_command, output_file


@pytest.fixture
async def serve(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """`ServeStack` on ephemeral ports: three PoPs, the echo, acme and globex; its info dict."""
    overrides: dict[str, Any] = getattr(request, "param", {}) or {}
    stack = ServeStack(ServeSettings(state_dir=tmp_path / "state", port_base=0, **overrides))
    info = await stack.start()
    try:
        yield info
    finally:
        await stack.close()
    current = asyncio.current_task()
    # Closing the stack ends everything it started: no task of it outlives close().
    leftover: set[asyncio.Task[Any]] = set()

    def quiet() -> bool:
        leftover.clear()
        leftover.update(task for task in asyncio.all_tasks() if task is not current and not task.done())
        return not leftover

    assert await settle(quiet), f"tasks left after ServeStack.close(): {leftover}"


@pytest.fixture
async def egressd_process(tmp_path: Path) -> AsyncIterator[Any]:
    """Starts `egressd ARGS...` children; every one is stopped at the end of the test."""
    started: list[EgressdProcess] = []

    async def start(args: Sequence[str], *, stdout_pipe: bool = False) -> EgressdProcess:
        stderr_path = tmp_path / f"egressd-{len(started)}.stderr"
        stderr = output_file(stderr_path)
        try:
            process = await asyncio.create_subprocess_exec(
                *egressd_command(), *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else asyncio.subprocess.DEVNULL,
                stderr=stderr, env=clean_env(), start_new_session=True,
            )
        finally:
            os.close(stderr)
        child = EgressdProcess(process, stderr_path)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            await child.stop()
