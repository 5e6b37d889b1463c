"""Running a long-lived command: uvloop when available, logging, and signal handling."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # hpack logs every header it encodes or decodes at DEBUG: a device link's
    # proxy-authorization (the device secret) among them. Never below INFO.
    logging.getLogger("hpack").setLevel(max(logging.INFO, logging.getLogger().level))


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


#: Allocations of container objects between young-generation collections (CPython's
#: default is 700). A PoP makes a few dozen per flow and keeps almost none of them, so
#: the default ran a collection every ~20 tunnels (2-3 % of a worker's time).
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once a server has started: move what start-up built (modules, the snapshot, the
    listeners) out of the collector's sight, and collect the young generation less often.
    Garbage cycles are still found, just in bigger batches."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


_early: list[int] = []


def _remember(signum: int, _frame: object) -> None:
    _early.append(signum)


def hold_signals() -> None:
    """Until the event loop takes over, remember SIGINT/SIGTERM/SIGHUP instead of dying
    of them: a signal sent right after start-up (or forwarded to a new worker) is honoured
    once the service is ready, not lost and not fatal."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _remember)


class SignalWaiter:
    """Loop signal handlers, installed before the service says it is ready.

    SIGINT/SIGTERM end `wait()` (returning the signal's name); SIGHUP calls `on_reload`.
    """

    def __init__(self, on_reload: Callable[[], Awaitable[None] | None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._reason = ""
        self._on_reload = on_reload
        self._loop.add_signal_handler(signal.SIGINT, self._request_stop, "SIGINT")
        self._loop.add_signal_handler(signal.SIGTERM, self._request_stop, "SIGTERM")
        self._loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        for signum in _early:
            if signum == signal.SIGHUP:
                self._request_reload()
            else:
                self._request_stop(signal.Signals(signum).name)
        _early.clear()

    def _request_stop(self, name: str) -> None:
        self._reason = self._reason or name
        self._stop.set()

    def _request_reload(self) -> None:
        if self._on_reload is not None:
            result = self._on_reload()
            if result is not None:
                asyncio.ensure_future(result)  # noqa: RUF006 - reload logs its own outcome

    async def wait(self) -> str:
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._loop.remove_signal_handler(sig)
        return self._reason
