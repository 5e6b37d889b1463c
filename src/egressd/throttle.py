"""Failed authentications per source address in fixed windows, with bounded memory.

Used by the PoPs (device logins) and the control plane (API and enrollment tokens): past
the limit, every attempt from that address is refused without checking the credentials
until its window ends, so a guessing client gains nothing from the service's speed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping


class AuthThrottle:
    """Authentication failures per source in fixed windows; bounded memory."""

    MAX_SOURCES = 65_536

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, tuple[float, int]] = {}
        #: The sources with failures counted (read-only outside this class): one not in it
        #: is not blocked, which a hot path can see without a call.
        self.failing: Mapping[str, tuple[float, int]] = self._failures

    def blocked(self, source: str, now: float | None = None) -> bool:
        if not self.limit:
            return False
        entry = self._failures.get(source)
        if entry is None:
            return False
        started, count = entry
        now = time.monotonic() if now is None else now
        if now - started >= self.window:
            del self._failures[source]
            return False
        return count >= self.limit

    def retry_after(self, source: str, now: float | None = None) -> float:
        """Seconds until a blocked source's window ends (0 if it is not blocked)."""
        if not self.blocked(source, now):
            return 0.0
        started, _ = self._failures[source]
        now = time.monotonic() if now is None else now
        return max(0.0, self.window - (now - started))

    def failed(self, source: str, now: float | None = None) -> bool:
        """Count a failure; True if this one reached the limit (log it once)."""
        if not self.limit:
            return False
        now = time.monotonic() if now is None else now
        started, count = self._failures.get(source, (now, 0))
        if now - started >= self.window:
            started, count = now, 0
        if len(self._failures) >= self.MAX_SOURCES and source not in self._failures:
            self._prune(now)
        self._failures[source] = (started, count + 1)
        return count + 1 == self.limit

    def _prune(self, now: float) -> None:
        expired = [key for key, (started, _) in self._failures.items()
                   if now - started >= self.window]
        for key in expired:
            del self._failures[key]
        if len(self._failures) >= self.MAX_SOURCES:  # a flood of sources: forget the oldest
            for key in list(self._failures)[: len(self._failures) // 2]:
                del self._failures[key]
