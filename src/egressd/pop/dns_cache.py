"""The PoP resolver's cache: upstream answers kept for their TTL, as wire sections.

Pure (the clock is passed in). An entry is an upstream answer's sections as
`protocols.dns_wire` read them; a hit is rendered for the asker with every TTL lowered by
the time spent here, so a device never keeps a record longer than its origin allows.
Negative answers stay for the SOA minimum (RFC 2308 §5), failures briefly (§7.1),
truncated or refused answers not at all. One cache serves the devices' queries (port 53,
DoH) and the PoP's own lookups for proxied flows. Bounded, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from egressd.protocols.dns_wire import Sections

CacheKey = tuple[bytes, int, int]  # (lower-cased wire name, type, class)
MAX_TTL = 86_400


@dataclass(frozen=True, slots=True)
class Entry:
    sections: Sections
    stored: float
    expires: float

    def age(self, now: float) -> int:
        return int(now - self.stored)


class DnsCache:
    def __init__(self, max_entries: int = 20_000, max_ttl: int = MAX_TTL) -> None:
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, sections: Sections, now: float) -> None:
        ttl = min(sections.cache_ttl, self.max_ttl)
        if ttl <= 0:
            return
        self._entries[key] = Entry(sections, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, key: CacheKey, now: float) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry
