"""Many timeouts through one event-loop timer: the handshake and connect timeouts of plain
connections.

Why not `loop.call_later` per connection: with uvloop a timer costs a Cython handle and a
libuv timer to start, stop and close, ~1.8 us for each of a tunnel's two timeouts, and
nearly every one is cancelled (handshakes finish in well under a second).

Theory of operation. Timeouts of one duration expire in the order they were set, so each
duration has a FIFO queue of entries `[deadline, callback]`; cancelling one clears its
callback (the entry stays until the sweep reaches it). One loop timer, armed for the
earliest deadline but at most `SWEEP_EVERY` ahead, pops what has expired or was
cancelled from the head of each queue and calls the callbacks of the expired ones. A
timeout fires up to `LATE_BY` after its deadline; cancelled entries are dropped within
`SWEEP_EVERY`, which bounds the memory they hold.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

#: The sweep runs at least this often while entries wait (it frees cancelled ones).
SWEEP_EVERY: Final = 1.0
#: The sweep is not re-armed sooner than this after it ran: a timeout may fire this late.
LATE_BY: Final = 0.05

#: `[deadline, callback]`; the callback is None once cancelled or fired.
Entry = list[Any]


class Deadlines:
    __slots__ = ("_armed_for", "_queues", "_timer")

    def __init__(self) -> None:
        self._queues: dict[float, deque[Entry]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def add(self, seconds: float, callback: Callable[[], object]) -> Entry:
        """Call `callback` in `seconds` (from the running loop) unless `cancel`led first."""
        entry: Entry = [time.monotonic() + seconds, callback]
        queue = self._queues.get(seconds)
        if queue is None:
            queue = self._queues[seconds] = deque()
        queue.append(entry)
        if entry[0] < self._armed_for:  # no timer, or one for later (a longer duration's)
            if self._timer is not None:
                self._timer.cancel()
            self._arm(entry[0])
        return entry

    @staticmethod
    def cancel(entry: Entry) -> None:
        entry[1] = None

    def __len__(self) -> int:
        """Entries held, cancelled ones not yet swept included."""
        return sum(len(queue) for queue in self._queues.values())

    def close(self) -> None:
        """Forget every timeout (the PoP closes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = math.inf
        self._queues.clear()

    def _arm(self, deadline: float) -> None:
        now = time.monotonic()
        delay = min(max(deadline - now, 0.0), SWEEP_EVERY)
        self._armed_for = now + delay
        self._timer = asyncio.get_running_loop().call_later(delay, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        self._armed_for = math.inf
        now = time.monotonic()
        earliest = math.inf
        for seconds, queue in list(self._queues.items()):
            while queue and (queue[0][1] is None or queue[0][0] <= now):
                entry = queue.popleft()
                callback, entry[1] = entry[1], None
                if callback is not None:
                    try:
                        callback()
                    except Exception as exc:  # as the loop does for its own callbacks
                        asyncio.get_running_loop().call_exception_handler(
                            {"message": f"exception in timeout callback {callback!r}", "exception": exc})
            if queue:
                earliest = min(earliest, queue[0][0])
            else:
                del self._queues[seconds]
        # A callback may have armed the timer already (by adding a timeout): keep the sooner.
        at = max(earliest, now + LATE_BY)
        if earliest < math.inf and at < self._armed_for:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(at)
