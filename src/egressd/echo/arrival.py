"""Which interface a client's packets arrived on: the lab's proof of the physical path.

In the lab the origin's namespace has one link per PoP, named after it, so the arrival
interface *is* the physical egress PoP — observed by the origin, not taken from the PoP's
word. Linux reports it with IP_PKTINFO / IPV6_PKTINFO: for UDP as ancillary data of each
datagram, for TCP through the legacy IP_PKTOPTIONS / IPV6_2292PKTOPTIONS socket option,
which returns the control messages of the last segment received (Python's `socket` module
has no names for these, hence the numbers from <linux/in.h> and <linux/in6.h>).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("egressd.echo")

IP_PKTINFO: Final = 8
IP_PKTOPTIONS: Final = 9
IPV6_2292PKTOPTIONS: Final = 6
IPV6_RECVPKTINFO: Final = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: Final = getattr(socket, "IPV6_PKTINFO", 50)
ANCILLARY_SIZE: Final = 256
_CMSG_HEADER = struct.Struct("@Nii")  # cmsg_len (size_t), cmsg_level, cmsg_type


def enable(sock: Any) -> None:
    """Ask the kernel to record the arrival interface on `sock` (and sockets it accepts)."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    elif sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        with contextlib.suppress(OSError):  # a dual-stack socket also gets IPv4 packets
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def interface_of(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    """The interface name in IP_PKTINFO / IPV6_PKTINFO control messages, if any."""
    for level, kind, data in ancillary:
        index = None
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 4:
            index = struct.unpack_from("@i", data)[0]
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            index = struct.unpack_from("@I", data, 16)[0]
        if index:
            try:
                return socket.if_indextoname(index)
            except OSError:
                return str(index)
    return None


def _parse_cmsgs(raw: bytes) -> list[tuple[int, int, bytes]]:
    messages: list[tuple[int, int, bytes]] = []
    offset = 0
    align = struct.calcsize("N")
    while offset + _CMSG_HEADER.size <= len(raw):
        length, level, kind = _CMSG_HEADER.unpack_from(raw, offset)
        if length < _CMSG_HEADER.size or offset + length > len(raw):
            break
        messages.append((level, kind, raw[offset + _CMSG_HEADER.size: offset + length]))
        offset += (length + align - 1) // align * align
    return messages


def tcp_arrival(sock: Any) -> str | None:
    """The interface the last segment on connected TCP socket `sock` arrived on."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_2292PKTOPTIONS, ANCILLARY_SIZE)
            found = interface_of(_parse_cmsgs(raw))
            if found is not None:
                return found
        raw = sock.getsockopt(socket.IPPROTO_IP, IP_PKTOPTIONS, ANCILLARY_SIZE)
    except OSError:
        return None
    return interface_of(_parse_cmsgs(raw))


def serve_udp_with_link(loop: asyncio.AbstractEventLoop, host: str, port: int,
                        answer: Callable[[bytes, tuple[str, int], str | None], bytes | None],
                        ) -> tuple[tuple[str, int], Callable[[], None]]:
    """A UDP server that knows each datagram's arrival interface: asyncio's datagram
    transport drops ancillary data, so the socket is read here with recvmsg. `answer` gets
    (datagram, peer, interface) and returns the reply or None. Returns (bound address, close)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(info[0], socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind(info[4])
        enable(sock)
    except OSError:
        sock.close()
        raise

    def readable() -> None:
        for _ in range(64):
            try:
                data, ancillary, _flags, addr = sock.recvmsg(65535, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier reply
                log.debug("udp: %s", exc)
                return
            reply = answer(data, (str(addr[0]), int(addr[1])), interface_of(ancillary))
            if reply is not None:
                try:
                    sock.sendto(reply, addr)
                except OSError as exc:
                    log.debug("udp reply: %s", exc)

    loop.add_reader(sock.fileno(), readable)

    def close() -> None:
        loop.remove_reader(sock.fileno())
        sock.close()

    name = sock.getsockname()
    return (str(name[0]), int(name[1])), close
