"""DNS messages at the wire level, for the PoP resolver's hot path (sans-I/O, pure).

dnspython parses and renders a message in ~60 µs — most of a forwarder's budget per query
(its names hash and re-compress on every use). A forwarding cache needs far less: the
question of a plain query, the answer's rcode and record TTLs, and the sections' bytes to
send again later with the TTLs aged. So this module reads exactly that, by hand (RFC 1035
§4.1), and refuses anything it does not fully understand — the caller then falls back to
dnspython. Compression pointers in stored sections stay valid because an answer is always
sent after a question of the same length at the same offset (the asker's own).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
QR, AA, TC, RD, RA, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_SOA, TYPE_OPT = 6, 41
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 default
OPT_RR = b"\x00" + struct.pack("!HHIH", TYPE_OPT, EDNS_PAYLOAD, 0, 0)
NEGATIVE_TTL = 30  # when a negative answer carries no SOA
SERVFAIL_TTL = 5  # RFC 2308 §7.1: briefly
MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Question:
    query_id: int
    flags: int
    name: bytes  # the wire name, lower-cased: the cache key with qtype and qclass
    qtype: int
    qclass: int
    end: int  # offset just after the question section
    edns_payload: int  # 0: the query had no OPT record

    @property
    def key(self) -> tuple[bytes, int, int]:
        return self.name, self.qtype, self.qclass

    def text(self) -> str:
        """The name as people write it (for logs), without the final dot."""
        labels, offset = [], 0
        while self.name[offset]:
            length = self.name[offset]
            labels.append(self.name[offset + 1: offset + 1 + length].decode("ascii", "replace"))
            offset += 1 + length
        return ".".join(labels)


def read_question(wire: bytes) -> Question | None:
    """The question of a plain query — header flags of a standard query, one question, no
    answer or authority records, at most an OPT record — or None."""
    if len(wire) < 17:
        return None
    query_id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(wire)
    if flags & 0xF800 or qdcount != 1 or ancount or nscount or arcount > 1:
        return None
    offset = 12
    while True:
        if offset >= len(wire):
            return None
        length = wire[offset]
        if length == 0:
            offset += 1
            break
        if length > 63 or offset + 1 + length > len(wire):
            return None  # a pointer or an extended label type: not in a plain question
        offset += 1 + length
        if offset - 12 > MAX_NAME:
            return None
    if offset + 4 > len(wire):
        return None
    qtype, qclass = struct.unpack_from("!HH", wire, offset)
    end = offset + 4
    payload = 0
    if arcount:
        if end + 11 > len(wire) or wire[end] != 0 or struct.unpack_from("!H", wire, end + 1)[0] != TYPE_OPT:
            return None
        payload = max(512, struct.unpack_from("!H", wire, end + 3)[0])
        if end + 11 + struct.unpack_from("!H", wire, end + 9)[0] != len(wire):
            return None
    elif end != len(wire):
        return None
    return Question(query_id, flags, wire[12:offset].lower(), qtype, qclass, end, payload)


def build_query(question: Question, query_id: int) -> bytes:
    """The question asked upstream: recursion desired, CD copied, EDNS with our payload."""
    flags = RD | (question.flags & CD)
    return (HEADER.pack(query_id, flags, 1, 0, 0, 1) + question.name
            + struct.pack("!HH", question.qtype, question.qclass) + OPT_RR)


@dataclass(frozen=True, slots=True)
class Sections:
    """An upstream's answer, kept: rcode, the answer and authority sections' bytes, their
    record counts, (offset, TTL) of each record, and how long it may be cached."""

    rcode: int
    body: bytes
    ancount: int
    nscount: int
    ttls: tuple[tuple[int, int], ...]
    cache_ttl: int
    truncated: bool = False


def _skip_name(wire: bytes, offset: int) -> int:
    """The offset after a (possibly compressed) name; IndexError/ValueError if broken."""
    for _ in range(128):
        length = wire[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > len(wire):
                raise ValueError("truncated pointer")
            return offset + 2
        if length > 63:
            raise ValueError("unknown label type")
        offset += 1 + length
    raise ValueError("name too long")


def read_answer(wire: bytes, question: Question) -> Sections | None:
    """The answer in an upstream's response to `question` (asked at offset 12 with the same
    name), or None if it is not a well-formed response to exactly that question (RFC 5452)."""
    if len(wire) < 12 + len(question.name) + 4:
        return None
    _id, flags, qdcount, ancount, nscount, _arcount = HEADER.unpack_from(wire)
    if not flags & QR or qdcount != 1 or flags & 0x7800:
        return None
    name_end = 12 + len(question.name)
    if wire[12:name_end].lower() != question.name:
        return None
    if wire[name_end:name_end + 4] != struct.pack("!HH", question.qtype, question.qclass):
        return None
    if flags & TC:  # its sections may be cut anywhere: only worth asking again over TCP
        return Sections(flags & 0x000F, b"", 0, 0, (), 0, truncated=True)
    start = offset = name_end + 4
    ttls: list[tuple[int, int]] = []
    answer_ttl: int | None = None
    negative_ttl: int | None = None
    try:
        for index in range(ancount + nscount):
            offset = _skip_name(wire, offset)
            rtype, _rclass, ttl, rdlength = struct.unpack_from("!HHIH", wire, offset)
            ttl = 0 if ttl > 0x7FFFFFFF else ttl  # RFC 2181 §8: a TTL with the top bit set is 0
            ttls.append((offset + 4 - start, ttl))
            if index < ancount:
                answer_ttl = ttl if answer_ttl is None else min(answer_ttl, ttl)
            elif rtype == TYPE_SOA and rdlength >= 22:
                minimum = struct.unpack_from("!I", wire, offset + 10 + rdlength - 4)[0]
                negative_ttl = min(ttl, minimum)
            offset += 10 + rdlength
            if offset > len(wire):
                return None
    except (IndexError, ValueError, struct.error):
        return None
    rcode = flags & 0x000F
    if rcode == SERVFAIL:
        cache_ttl = SERVFAIL_TTL
    elif rcode == NOERROR and answer_ttl is not None:
        cache_ttl = answer_ttl
    else:
        cache_ttl = negative_ttl if negative_ttl is not None else NEGATIVE_TTL
    if rcode not in (NOERROR, NXDOMAIN, SERVFAIL):
        cache_ttl = 0  # REFUSED, FORMERR...: about the query, not the name
    return Sections(rcode, wire[start:offset], ancount, nscount, tuple(ttls), cache_ttl, bool(flags & TC))


def render(question: Question, query: bytes, sections: Sections, age: int, limit: int) -> bytes:
    """The response to `query`: its header and question (the asker's case), the sections
    with every TTL lowered by `age`, an OPT record if the query had one; past `limit`
    bytes, header and question with TC set (the client retries over TCP)."""
    flags = QR | RA | (question.flags & (RD | CD)) | sections.rcode
    opt = OPT_RR if question.edns_payload else b""
    question_bytes = query[12:question.end]
    if question.end + len(sections.body) + len(opt) > limit:
        header = HEADER.pack(question.query_id, flags | TC, 1, 0, 0, 1 if opt else 0)
        return header + question_bytes + opt
    body = bytearray(sections.body)
    if age:
        for offset, ttl in sections.ttls:
            struct.pack_into("!I", body, offset, max(0, ttl - age))
    header = HEADER.pack(question.query_id, flags, 1, sections.ancount, sections.nscount, 1 if opt else 0)
    return header + question_bytes + bytes(body) + opt


def error(question: Question, query: bytes, rcode: int) -> bytes:
    """REFUSED, SERVFAIL...: header and question only."""
    empty = Sections(rcode, b"", 0, 0, (), 0)
    return render(question, query, empty, 0, 65535)
