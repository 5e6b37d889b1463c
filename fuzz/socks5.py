#!/usr/bin/env python3
"""atheris harness: SOCKS5 (`Socks5Server` dialogue, UDP datagram header).

Properties: the server never raises on client bytes (malformed input is an event), and
the events, the bytes it sends and the tunnel bytes after the request are the same in any
chunking, byte by byte included; a UDP header parses or raises `ProtocolError`, and
what parses is rebuilt to the same destination, fragment number and payload. The
dialogue is driven as a PoP drives it: credentials accepted (flags bit 0: rejected),
then a success reply (bit 1: a failure).

    python fuzz/socks5.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

from _fuzzlib import fuzz, instrumented, only, unpack

with instrumented(__name__):
    from egressd.protocols.socks5 import (
        CredentialsReceived,
        Event,
        ProtocolError,
        ReplyCode,
        RequestReceived,
        Socks5Server,
        Socks5State,
        build_udp_datagram,
        parse_udp_datagram,
    )


def drive(chunks: list[bytes], flags: int) -> tuple[list[Event], bytes, Socks5State, bytes]:
    # The default buffer bound (64 KiB) is above any input: the bound fails a client that
    # sends too much *before a decision*, which depends on the chunking by design.
    server = Socks5Server()
    events: list[Event] = []
    sent = b""
    pending = list(chunks)
    while pending:
        new = server.receive_data(pending.pop(0))
        sent += server.data_to_send()
        while new:
            events += new
            last, new = new[-1], []
            if isinstance(last, CredentialsReceived):
                if flags & 1:
                    sent += server.reject_credentials()
                    return events, sent, server.state, b""
                sent += server.accept_credentials()
                new = server.receive_data(b"")
                sent += server.data_to_send()
            elif isinstance(last, RequestReceived):
                code = ReplyCode.HOST_UNREACHABLE if flags & 2 else ReplyCode.SUCCEEDED
                rest = server.remainder() + b"".join(pending)
                sent += server.reply(code, "192.0.2.1", 1)
                return events, sent, server.state, rest
    return events, sent, server.state, b""


def check(data: bytes) -> None:
    fuzz_input = unpack(data)
    whole = drive([fuzz_input.payload], fuzz_input.flags)
    assert drive(fuzz_input.chunks, fuzz_input.flags) == whole
    if fuzz_input.bytewise is not None:
        assert drive(fuzz_input.bytewise, fuzz_input.flags) == whole
    with only(ProtocolError) as caught:
        datagram = parse_udp_datagram(fuzz_input.payload)
    if not caught:
        rebuilt = parse_udp_datagram(
            build_udp_datagram(datagram.host, datagram.port, datagram.payload, frag=datagram.frag))
        # address_type is the type on the wire: an IP literal sent as a domain name comes
        # back as that IP (canonical), and is rebuilt with the IP's own type.
        assert (rebuilt.frag, rebuilt.host, rebuilt.port, rebuilt.payload) == (
            datagram.frag, datagram.host, datagram.port, datagram.payload)


if __name__ == "__main__":
    fuzz(check)
