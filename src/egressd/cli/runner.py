"""Running a long-lived command: uvloop when available, logging, and signal handling."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on uvloop (the standard loop if uvloop is missing or
    EGRESSD_EVENT_LOOP=asyncio, for comparisons)."""
    if os.environ.get("EGRESSD_EVENT_LOOP") == "asyncio":
        asyncio.run(main())
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(main())
        return
    uvloop.run(main())


async def wait_for_signals(on_reload: Callable[[], Awaitable[None] | None] | None = None) -> str:
    """Wait for SIGINT/SIGTERM (returned as the stop reason); SIGHUP calls `on_reload`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = {"signal": ""}

    def request_stop(name: str) -> None:
        reason["signal"] = name
        stop.set()

    def request_reload() -> None:
        if on_reload is not None:
            result = on_reload()
            if result is not None:
                asyncio.ensure_future(result)  # noqa: RUF006 - reload logs its own outcome

    loop.add_signal_handler(signal.SIGINT, request_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGHUP, request_reload)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return reason["signal"]
