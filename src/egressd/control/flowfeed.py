"""The live flow feed: the newest flow-log records the PoPs pushed, for the dashboard's
tail. A bounded ring per replica, in memory: the flow log files on the PoPs stay the
record; this is the view."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Record = dict[str, Any]


class FlowFeed:
    def __init__(self, capacity: int = 20_000) -> None:
        self._ring: deque[tuple[int, Record]] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._last = 0
        self._changed = asyncio.Condition()
        self.received = 0
        self.closing = False

    @property
    def last(self) -> int:
        return self._last

    async def add(self, records: Iterable[Mapping[str, Any]]) -> int:
        added = 0
        for record in records:
            self._last = next(self._seq)
            self._ring.append((self._last, dict(record)))
            added += 1
        self.received += added
        if added:
            async with self._changed:
                self._changed.notify_all()
        return added

    def since(self, after: int, keep: Callable[[Record], bool], limit: int) -> list[Record]:
        """Matching records newer than `after`, oldest first, at most the newest `limit`."""
        found = [dict(record, seq=seq) for seq, record in self._ring if seq > after and keep(record)]
        return found[-limit:]

    async def wait(self, after: int, seconds: float) -> None:
        """Until a record newer than `after` exists, `seconds` pass, or the feed closes."""
        if self._last > after or seconds <= 0 or self.closing:
            return
        try:
            async with asyncio.timeout(seconds), self._changed:
                while self._last <= after and not self.closing:
                    await self._changed.wait()
        except TimeoutError:
            return

    async def release_waiters(self) -> None:
        """The server is stopping: answer every parked tail now."""
        self.closing = True
        async with self._changed:
            self._changed.notify_all()
