"""Admission: caps that keep one source or one account from taking the PoP (issue 9).

- Concurrent handshakes per source address (connections that have not finished their
  first request): a slowloris from one address gets `max_handshakes_per_source` slots, then
  its new connections are closed at accept, before they cost a buffer or a timer.
- Concurrent flows per account and per source address, checked before the upstream connect.
- Authentication failures per source address in a fixed window: past the limit, every
  attempt from that address is refused without looking at the credentials until the
  window ends — a guessing client gains nothing from the PoP's speed. Credentials are
  still checked on every connection and request; nothing is cached per address.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from egressd.throttle import AuthThrottle

__all__ = ["AdmissionLimits", "AuthThrottle", "PeerSet", "SourceCounter"]


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """0 disables a limit."""

    max_handshakes_per_source: int = 64
    max_connections_per_source: int = 1024  # TLS listener: whole connections
    max_flows_per_source: int = 4096
    max_flows_per_account: int = 10_000
    auth_failures_per_source: int = 30
    auth_failure_window: float = 60.0


class HasPeer(Protocol):
    @property
    def peer(self) -> tuple[str, int]: ...


T = TypeVar("T", bound=HasPeer)


class PeerSet(Generic[T]):
    """A set of connections that also counts them per source address."""

    __slots__ = ("_items", "per_source")

    def __init__(self) -> None:
        self._items: set[T] = set()
        # A dict, not a Counter: a Counter's missing key is a Python `__missing__` call,
        # and the first connection from a source (every one, at low load) meets one.
        self.per_source: dict[str, int] = {}

    def add(self, item: T) -> None:
        if item not in self._items:
            self._items.add(item)
            source = item.peer[0]
            self.per_source[source] = self.per_source.get(source, 0) + 1

    def discard(self, item: T) -> None:
        if item in self._items:
            self._items.remove(item)
            source = item.peer[0]
            left = self.per_source.get(source, 0) - 1
            if left > 0:
                self.per_source[source] = left
            else:
                del self.per_source[source]

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items


class SourceCounter:
    """Counts held by keys (a source address, an account), with a cap."""

    __slots__ = ("_counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}  # a dict, not a Counter: see `PeerSet`

    def try_acquire(self, key: str) -> bool:
        counts = self._counts
        held = counts.get(key, 0)
        if self.limit and held >= self.limit:
            return False
        counts[key] = held + 1
        return True

    def release(self, key: str) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)

    def __getitem__(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)
