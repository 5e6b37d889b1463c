"""Which interface a client's packets arrived on: the lab's proof of the physical path.

In the lab the origin's namespace has one link per PoP, named after it, so the arrival
interface *is* the physical egress PoP — observed by the origin, not taken from the PoP's
word. Linux reports it with IP_PKTINFO / IPV6_PKTINFO: for UDP as ancillary data of each
datagram, for TCP through the legacy IP_PKTOPTIONS / IPV6_2292PKTOPTIONS socket option,
which returns the control messages of the last segment received (Python's `socket` module
has no names for these, hence the numbers from <linux/in.h> and <linux/in6.h>).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any, Final

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
