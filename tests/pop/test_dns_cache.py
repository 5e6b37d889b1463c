"""The PoP resolver's wire-level hot path and its cache, pure, checked against dnspython:
questions read from the wire, upstream answers read (and refused when they do not echo
the question, RFC 5452), answers rendered with aged TTLs, the asker's case and EDNS,
truncated past the limit; negative answers kept for the SOA minimum (RFC 2308), failures
briefly, refusals never; the cache bounded, least recently used first."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from egressd.pop.dns_cache import DnsCache
from egressd.protocols import dns_wire
from egressd.protocols.dns_wire import read_answer, read_question, render

NAME = "echo.lab.egressd.test."


def question_of(name: str = NAME, kind: str = "A", *, edns: bool = False) -> tuple[bytes, dns_wire.Question]:
    wire = dns.message.make_query(name, kind, use_edns=0 if edns else False).to_wire()
    question = read_question(wire)
    assert question is not None
    return wire, question


def upstream_answer(wire: bytes, *records: tuple[str, int, str, str], rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
                    authority: tuple[str, int, str, str] | None = None) -> bytes:
    response = dns.message.make_response(dns.message.from_wire(wire))
    response.set_rcode(rcode)
    for name, ttl, kind, value in records:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", kind, value))
    if authority is not None:
        response.authority.append(dns.rrset.from_text(authority[0], authority[1], "IN", authority[2], authority[3]))
    return response.to_wire()


def test_a_plain_question_is_read_from_the_wire() -> None:
    wire, question = question_of("EcHo.Lab.egressd.test.", "AAAA", edns=True)
    parsed = dns.message.from_wire(wire)
    assert question.query_id == parsed.id and question.qtype == 28 and question.qclass == 1
    assert question.name == b"\x04echo\x03lab\x07egressd\x04test\x00"  # lower-cased: the key
    assert question.edns_payload == 1232 and question.text() == "echo.lab.egressd.test"


def test_anything_but_a_plain_query_is_left_to_the_slow_path() -> None:
    plain = dns.message.make_query("a.test.", "A")
    response = dns.message.make_response(plain).to_wire()
    two = dns.message.make_query("a.test.", "A")
    two.question.append(two.question[0])
    notify = dns.message.make_query("a.test.", "SOA")
    notify.set_opcode(4)
    for odd in (response, two.to_wire(), notify.to_wire(), b"\x00" * 11, plain.to_wire() + b"junk",
                plain.to_wire()[:-2], b"\x00" * 12 + b"\xc0\x0c\x00\x01\x00\x01"):
        assert read_question(odd) is None


def test_an_answer_is_read_and_rendered_for_the_asker_with_aged_ttls() -> None:
    wire, question = question_of(NAME)
    upstream = upstream_answer(wire, (NAME, 300, "A", "203.0.113.100"), (NAME, 120, "A", "203.0.113.101"))
    sections = read_answer(upstream, question)
    assert sections is not None and sections.cache_ttl == 120 and sections.ancount == 2
    for edns in (False, True):
        asker_wire, asker = question_of("ECHO.lab.egressd.TEST.", edns=edns)
        mixed = dns.message.from_wire(asker_wire)
        served = dns.message.from_wire(render(asker, asker_wire, sections, 7, 65535))
        assert served.id == mixed.id and served.flags & dns.flags.QR and served.flags & dns.flags.RA
        assert served.flags & dns.flags.RD and not served.flags & dns.flags.AA
        assert served.question[0].name.to_text() == "ECHO.lab.egressd.TEST."  # the asker's case (0x20)
        assert sorted(r.to_text() for r in served.answer[0]) == ["203.0.113.100", "203.0.113.101"]
        assert served.answer[0].ttl == 113  # the rrset's TTL is its smallest, aged by 7 s
        assert (served.edns >= 0) is edns


def test_an_answer_to_another_question_is_refused() -> None:
    wire, question = question_of(NAME)
    other_wire, _ = question_of("other.lab.egressd.test.")
    assert read_answer(upstream_answer(other_wire, ("other.lab.egressd.test.", 60, "A", "192.0.2.1")), question) is None
    aaaa_wire, _ = question_of(NAME, "AAAA")
    assert read_answer(upstream_answer(aaaa_wire), question) is None  # same name, other type
    assert read_answer(wire, question) is None  # a query, not a response
    assert read_answer(upstream_answer(wire, (NAME, 60, "A", "192.0.2.1"))[:-3], question) is None  # cut short


def test_negative_answers_last_the_soa_minimum_failures_briefly_refusals_never() -> None:
    wire, question = question_of("nothing.lab.egressd.test.")
    soa = ("lab.egressd.test.", 600, "SOA", "ns. admin. 1 3600 600 86400 45")
    nxdomain = read_answer(upstream_answer(wire, rcode=dns.rcode.NXDOMAIN, authority=soa), question)
    assert nxdomain is not None and nxdomain.rcode == dns_wire.NXDOMAIN and nxdomain.cache_ttl == 45
    bare = read_answer(upstream_answer(wire, rcode=dns.rcode.NXDOMAIN), question)
    assert bare is not None and bare.cache_ttl == dns_wire.NEGATIVE_TTL
    failed = read_answer(upstream_answer(wire, rcode=dns.rcode.SERVFAIL), question)
    assert failed is not None and failed.cache_ttl == dns_wire.SERVFAIL_TTL
    refused = read_answer(upstream_answer(wire, rcode=dns.rcode.REFUSED), question)
    assert refused is not None and refused.cache_ttl == 0
    served = dns.message.from_wire(render(question, wire, nxdomain, 5, 65535))
    assert served.rcode() == dns.rcode.NXDOMAIN and served.authority[0].ttl == 595


def test_a_truncated_upstream_answer_is_marked_for_tcp() -> None:
    wire, question = question_of(NAME)
    response = dns.message.from_wire(upstream_answer(wire, (NAME, 60, "A", "192.0.2.1")))
    response.flags |= dns.flags.TC
    sections = read_answer(response.to_wire(), question)
    assert sections is not None and sections.truncated and sections.cache_ttl == 0


def test_an_answer_too_large_for_the_asker_is_truncated() -> None:
    wire, question = question_of(NAME)
    records = [(NAME, 60, "A", f"192.0.2.{i}") for i in range(1, 60)]
    sections = read_answer(upstream_answer(wire, *records), question)
    assert sections is not None
    served = dns.message.from_wire(render(question, wire, sections, 0, 512))
    assert served.flags & dns.flags.TC and not served.answer
    whole = dns.message.from_wire(render(question, wire, sections, 0, 65535))
    assert len(whole.answer[0]) == 59


@pytest.mark.parametrize("rcode", [dns_wire.REFUSED, dns_wire.SERVFAIL])
def test_error_answers_keep_the_question(rcode: int) -> None:
    wire, question = question_of(NAME, edns=True)
    served = dns.message.from_wire(dns_wire.error(question, wire, rcode))
    assert served.rcode() == rcode and served.question[0].name.to_text() == NAME and not served.answer


def test_the_cache_ages_expires_and_evicts_least_recently_used() -> None:
    wire, question = question_of(NAME)
    sections = read_answer(upstream_answer(wire, (NAME, 300, "A", "203.0.113.100")), question)
    assert sections is not None
    cache = DnsCache(max_entries=2)
    cache.put(question.key, sections, now=1000.0)
    entry = cache.get(question.key, now=1100.4)
    assert entry is not None and entry.age(1100.4) == 100
    assert cache.get(question.key, now=1300.0) is None and len(cache) == 0  # expired: dropped
    keys = [(f"k{i}".encode(), 1, 1) for i in range(3)]
    for index, key in enumerate(keys):
        cache.put(key, sections, now=0.0)
        if index == 1:
            assert cache.get(keys[0], now=1.0) is not None  # k0 is now the most recently used
    assert cache.get(keys[1], now=1.0) is None  # k1 was evicted, not k0
    refused = read_answer(upstream_answer(wire, rcode=dns.rcode.REFUSED), question)
    assert refused is not None
    cache.put(question.key, refused, now=0.0)
    assert cache.get(question.key, now=0.1) is None
