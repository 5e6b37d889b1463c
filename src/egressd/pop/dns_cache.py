"""The PoP resolver's cache: answers kept for their TTL, negative answers for the SOA minimum.

Pure (the clock is passed in): a cached entry is the response's rcode and sections; a hit
is served with every TTL lowered by the time spent in the cache, so a device never keeps
a record longer than its origin allows. One cache serves the devices' queries (port 53,
DoH) and the PoP's own lookups for proxied flows (DESIGN: "the same resolver and cache").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

CacheKey = tuple[dns.name.Name, int, int]  # (lower-cased name, type, class)

MAX_TTL = 86_400.0
NEGATIVE_TTL = 30.0  # when the authority section has no SOA to say
SERVFAIL_TTL = 5.0  # RFC 2308 §7.1: a short while, so a failing upstream is not hammered


@dataclass(frozen=True, slots=True)
class Cached:
    rcode: dns.rcode.Rcode
    answer: tuple[dns.rrset.RRset, ...]
    authority: tuple[dns.rrset.RRset, ...]
    stored: float
    expires: float


def key_of(question: dns.rrset.RRset) -> CacheKey:
    return (question.name.canonicalize(), int(question.rdtype), int(question.rdclass))


def ttl_of(response: dns.message.Message) -> float:
    """How long `response` may be cached: the smallest answer TTL, for a negative answer
    the SOA's (min of its TTL and MINIMUM, RFC 2308 §5)."""
    rcode = response.rcode()
    if rcode == dns.rcode.SERVFAIL:
        return SERVFAIL_TTL
    if response.answer and rcode == dns.rcode.NOERROR:
        return float(min(rrset.ttl for rrset in response.answer))
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL


class DnsCache:
    """A bounded LRU of answers; `get` gives a response for a query, TTLs aged."""

    def __init__(self, max_entries: int = 20_000, max_ttl: float = MAX_TTL) -> None:
        self._entries: OrderedDict[CacheKey, Cached] = OrderedDict()
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, response: dns.message.Message, now: float) -> None:
        if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL):
            return  # REFUSED, FORMERR... say something about the query, not the name
        if response.flags & dns.flags.TC:
            return  # a truncated answer is not the answer
        ttl = min(ttl_of(response), self.max_ttl)
        if ttl <= 0:
            return
        self._entries[key] = Cached(response.rcode(), tuple(response.answer), tuple(response.authority),
                                    now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, key: CacheKey, now: float) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def response(self, entry: Cached, query: dns.message.Message, now: float) -> dns.message.Message:
        """`entry` as the answer to `query`, every TTL lowered by its age in the cache."""
        age = int(now - entry.stored)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.set_rcode(entry.rcode)
        for source, target in ((entry.answer, response.answer), (entry.authority, response.authority)):
            for rrset in source:
                target.append(dns.rrset.from_rdata_list(rrset.name, max(0, rrset.ttl - age), list(rrset)))
        return response
