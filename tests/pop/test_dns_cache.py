"""The PoP resolver's cache, pure: TTLs aged on the way out, negative answers for the SOA
minimum (RFC 2308), failures briefly, truncated and refused answers never, LRU bounded."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from egressd.pop.dns_cache import NEGATIVE_TTL, SERVFAIL_TTL, DnsCache, key_of, ttl_of


def answer(name: str, ttl: int, address: str = "203.0.113.100") -> tuple[dns.message.Message, dns.message.Message]:
    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", address))
    return query, response


def test_a_hit_is_served_with_its_ttl_aged() -> None:
    cache = DnsCache()
    query, response = answer("echo.lab.egressd.test.", 300)
    key = key_of(query.question[0])
    cache.put(key, response, now=1000.0)
    entry = cache.get(key, now=1100.4)
    assert entry is not None
    served = cache.response(entry, query, now=1100.4)
    assert served.id == query.id and served.flags & dns.flags.RA
    assert served.answer[0].ttl == 200 and [r.to_text() for r in served.answer[0]] == ["203.0.113.100"]
    assert cache.get(key, now=1300.0) is None and len(cache) == 0  # expired: dropped
    assert (cache.hits, cache.misses) == (1, 1)


def test_names_are_keyed_case_insensitively() -> None:
    cache = DnsCache()
    query, response = answer("Echo.Lab.Egressd.Test.", 60)
    cache.put(key_of(query.question[0]), response, now=0.0)
    other = dns.message.make_query("echo.lab.egressd.test.", "A")
    assert cache.get(key_of(other.question[0]), now=1.0) is not None


def test_negative_answers_last_the_soa_minimum_and_failures_briefly() -> None:
    query = dns.message.make_query("nothing.lab.egressd.test.", "A")
    nxdomain = dns.message.make_response(query)
    nxdomain.set_rcode(dns.rcode.NXDOMAIN)
    assert ttl_of(nxdomain) == NEGATIVE_TTL
    nxdomain.authority.append(dns.rrset.from_text(
        "lab.egressd.test.", 600, "IN", "SOA", "ns. admin. 1 3600 600 86400 45"))
    assert ttl_of(nxdomain) == 45  # min(SOA TTL, MINIMUM)
    failed = dns.message.make_response(query)
    failed.set_rcode(dns.rcode.SERVFAIL)
    assert ttl_of(failed) == SERVFAIL_TTL


def test_truncated_refused_and_zero_ttl_answers_are_not_kept() -> None:
    cache = DnsCache()
    query, truncated = answer("a.test.", 60)
    truncated.flags |= dns.flags.TC
    cache.put(key_of(query.question[0]), truncated, now=0.0)
    refused = dns.message.make_response(query)
    refused.set_rcode(dns.rcode.REFUSED)
    cache.put(key_of(query.question[0]), refused, now=0.0)
    _, zero = answer("a.test.", 0)
    cache.put(key_of(query.question[0]), zero, now=0.0)
    assert len(cache) == 0


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = DnsCache(max_entries=2)
    keys = []
    for name in ("a.test.", "b.test.", "c.test."):
        query, response = answer(name, 60)
        keys.append(key_of(query.question[0]))
        cache.put(keys[-1], response, now=0.0)
        if name == "b.test.":
            assert cache.get(keys[0], now=1.0) is not None  # a is now the most recently used
    assert len(cache) == 2
    assert cache.get(keys[1], now=1.0) is None  # b was evicted, not a
    assert cache.get(keys[0], now=1.0) is not None and cache.get(keys[2], now=1.0) is not None
