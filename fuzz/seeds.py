"""Writes the hand-made seed inputs of every harness into fuzz/corpus/<codec>/seed-*.

Seeds give the fuzzer well-formed messages to mutate (random bytes rarely get past a
request line) and the hostile cases the codecs must refuse. Run it after changing the
input layout in `_fuzzlib.py`; the files are kept in the repository and replayed by
`tests/protocols/test_fuzz_corpus.py`.

    python fuzz/seeds.py
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from _fuzzlib import pack

from egressd.protocols.proxy_v2 import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    SIGNATURE,
    encode_proxy_v2,
    encode_proxy_v2_local,
)

CORPUS = Path(__file__).resolve().parent / "corpus"

REQUESTS = [
    b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET http://example.com:8080/a?b=c HTTP/1.1\r\nHost: example.com\r\nProxy-Authorization: Basic dTpw\r\n"
    b"Connection: keep-alive, X-A\r\nX-A: 1\r\nUser-Agent: curl/8\r\n\r\nGET http://example.com/2 HTTP/1.1\r\n"
    b"Host: example.com\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01",
    b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
    b"POST http://192.0.2.1/ HTTP/1.1\r\nHost: 192.0.2.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://a/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\r\nGET /health HTTP/1.0\r\n\r\n",
    b"GET /pac/acme.pac HTTP/1.1\r\nHost: pop\r\nConnection: close\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\nContent-Length: 2\r\n\r\n",
    b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n",
    b"GET http://a/ HTTP/1.1\nHost: a\n\n",
    b"GET http://u@a/ HTTP/1.1\r\nHost : a\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"CONNECT a:0443 HTTP/1.1\r\n\r\n",
    b"GET http://0x7f.1/ HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
]
BODIES = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"1F;name=\"v a\"\r\n" + b"x" * 31 + b"\r\n0;x\r\nT: v\r\nU: w\r\n\r\nnext",
    b"0\r\n\r\n",
    b"7fffffffffffffff\r\n",
    b"8000000000000000\r\n",
    b"5\nhello\r\n",
    b"0\r\nX : y\r\n\r\n",
]


def socks_dialogue(request: bytes) -> bytes:
    return b"\x05\x02\x00\x02" + b"\x01\x05alice\x06s3cret" + request


SOCKS = [
    socks_dialogue(b"\x05\x01\x00\x01\xc0\x00\x02\x01\x01\xbbtunnel"),
    socks_dialogue(b"\x05\x01\x00\x03\x0bexample.com\x00\x50"),
    socks_dialogue(b"\x05\x03\x00\x04" + bytes(15) + b"\x01\x00\x00"),
    socks_dialogue(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50"),
    socks_dialogue(b"\x05\x01\x01\x03\x00\x00\x50"),
    b"\x05\x00",
    b"\x05\x01\x00",
    b"\x05\x01\x02\x02\x01u\x01p",
    b"\x00\x00\x00\x01\xc0\x00\x02\x01\x00\x35payload",
    b"\x00\x00\x01\x03\x0bexample.com\x01\xbbpayload",
    b"\x00\x00\x00\x04" + bytes(16) + b"\x00\x35",
]
PROXY = [
    encode_proxy_v2(("192.0.2.1", 1234), ("198.51.100.1", 80)),
    encode_proxy_v2(("2001:db8::7", 1), ("2001:db8::8", 443), "udp",
                    [(PP2_TYPE_ALPN, b"h3"), (PP2_TYPE_AUTHORITY, b"example.com")], checksum=True),
    encode_proxy_v2_local(),
    SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216),
    SIGNATURE + b"\x21\x00" + struct.pack("!H", 3) + b"abc",
    SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12) + b"GET / HTTP/1.1\r\n\r\n",
]
GEOFEEDS = [
    b"# RFC 8805 geofeed\n192.0.2.0/24,US,US-CA,Los Angeles,\n2001:db8::/32,CH,CH-ZH,Z\xc3\xbcrich\n",
    b'198.51.100.7/32,us,us-ny,"New York, NY",10001\r\n203.0.113.0/24\r\n',
    b"\xef\xbb\xbf192.0.2.0/25,FR,FR-IDF,Paris\n192.0.2.128/25,FR,,\n",
    b"192.0.2.0/24,US,US-CA,X\xe2\x80\xa8198.51.100.0/24,US,US-NY,Y\n",
    b"192.0.2.1/24,US,CA,a,b,c\n",
    # As one entry's city and postal code (split at NUL): no field may add a line.
    b"Los Angeles\x0090001",
    "X\u2028198.51.100.0/24,US,US-NY,Y".encode(),
    "X\x85198.51.100.0/24\x00\u2029".encode(),
    b'"quoted, with comma"\x00#',
]

SEEDS: dict[str, list[bytes]] = {
    "http1_request": [pack(sample, flags) for sample in REQUESTS for flags in (0, 1)]
    + [pack(REQUESTS[1], 0, bytes([17, 60, 130, 200]))],
    "http1_response": [pack(sample, flags) for sample in RESPONSES for flags in (0, 1, 2)],
    "http1_body": [pack(sample, flags) for sample in BODIES for flags in (0, 2, 4 * 9 + 1)],
    "socks5": [pack(sample, flags, cuts) for sample in SOCKS for flags, cuts in ((0, b""), (3, b"\x07\x30"))],
    "proxy_v2": [pack(sample, 0, cut) for sample in PROXY for cut in (b"", b"\x20")]
    + [pack(SIGNATURE[:4], 0), pack(b"\x21\x11\x00\x0c" + bytes(12), 1)],
    "geofeed": [pack(sample) for sample in GEOFEEDS],
}


def main() -> None:
    for codec, seeds in SEEDS.items():
        folder = CORPUS / codec
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for seed in seeds:
            (folder / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)  # noqa: S324
        print(f"{codec}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
