"""The one door to the network: every upstream socket of a PoP is created here.

It turns a Decision's source address into a bound socket (R15: `IP_BIND_ADDRESS_NO_PORT`
so the port is chosen at connect() time, per 4-tuple, never an explicit port; and
`IP_LOCAL_PORT_RANGE` where the kernel has it), runs Happy Eyeballs (RFC 8305) over the
candidate addresses, and maps OS errors to `UpstreamError` with a reason a user can read.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TypeVar

from egressd.model.addresses import IPAddress, address_text

# Linux values; the socket module has no names for some of them on Python 3.11.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_LOCAL_PORT_RANGE = 51  # Linux >= 6.3
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78  # Linux >= 4.15

CONNECTION_ATTEMPT_DELAY_S = 0.25  # RFC 8305 §5 recommended value
#: The first byte of `struct tcp_info` (`tcpi_state`) of an established connection.
_ESTABLISHED = bytes([1])  # TCP_ESTABLISHED

T = TypeVar("T")


class UpstreamError(Exception):
    """An upstream could not be reached. `status` is the HTTP status a proxy should answer."""

    def __init__(self, reason: str, *, status: int = 502, socks_reply: int = 0x01) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.socks_reply = socks_reply


def _read_port_range() -> tuple[int, int] | None:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
            low, high = (int(part) for part in handle.read().split())
    except (OSError, ValueError):
        return None
    return low, high


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """How upstream sockets are made; one instance per PoP process."""

    local_port_range: tuple[int, int] | None = _read_port_range()
    freebind_ipv6: bool = True  # dedicated IPv6 ranges are routed, not configured (R9)
    freebind_ipv4: bool = False


_port_range_supported = True
#: IP_LOCAL_PORT_RANGE's value per (low, high), packed once.
_packed_ranges: dict[tuple[int, int], bytes] = {}


def make_tcp_socket(source: IPAddress, options: SocketOptions) -> socket.socket:
    """A non-blocking TCP socket bound to `source` with no port yet (R15)."""
    global _port_range_supported
    family = socket.AF_INET if isinstance(source, IPv4Address) else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # no FIONBIO call
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        if options.local_port_range and _port_range_supported:
            port_range = _packed_ranges.get(options.local_port_range)
            if port_range is None:  # u32 (high << 16 | low): above INT_MAX, so bytes
                low, high = options.local_port_range
                port_range = _packed_ranges[options.local_port_range] = struct.pack("=I", (high << 16) | low)
            try:
                sock.setsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, port_range)
            except OSError as exc:
                if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                    raise
                _port_range_supported = False  # older kernel: IP_BIND_ADDRESS_NO_PORT alone
        _set_freebind(sock, source, options)
        sock.bind((address_text(source), 0))
    except OSError as exc:
        sock.close()
        raise UpstreamError(f"cannot bind source address {source}: {exc.strerror}", status=502) from exc
    return sock


def make_udp_socket(source: IPAddress, options: SocketOptions) -> socket.socket:
    """A non-blocking UDP socket bound to `source`, port chosen by the kernel."""
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _set_freebind(sock, source, options)
        sock.bind((str(source), 0))
    except OSError as exc:
        sock.close()
        raise UpstreamError(f"cannot bind UDP source address {source}: {exc.strerror}") from exc
    return sock


def _set_freebind(sock: socket.socket, source: IPAddress, options: SocketOptions) -> None:
    # isinstance, not `.version`: that is a Python property, and this runs per connection.
    if isinstance(source, IPv4Address):
        if options.freebind_ipv4:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    elif options.freebind_ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)


def bound_address(upstream: socket.socket) -> tuple[str, int]:
    """The address and port a flow left from, for SOCKS5's BND.ADDR: the socket's own, or
    for a flow carried over the backbone (a socket pair to the link) the egress PoP's, as it
    reported it (`egress_local`, "ip:port")."""
    if upstream.family in (socket.AF_INET, socket.AF_INET6):
        name = upstream.getsockname()
        return str(name[0]), int(name[1])
    reported = getattr(upstream, "egress_local", None) or ""
    host, _, port = reported.rpartition(":")
    if host and port.isdigit():
        return host.strip("[]"), int(port)
    return "0.0.0.0", 0


async def connect_tcp(
    source: IPAddress, address: IPAddress, port: int, options: SocketOptions, connect_timeout: float
) -> socket.socket:
    """Connect from `source` to `address:port`; the caller owns the returned socket."""
    sock = make_tcp_socket(source, options)
    try:
        async with asyncio.timeout(connect_timeout):
            await _connect(sock, (str(address), port))
    except TimeoutError as exc:
        sock.close()
        raise connect_timed_out(address, port, connect_timeout) from exc
    except OSError as exc:
        sock.close()
        raise _map_connect_error(exc, address, port) from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(sock: socket.socket, target: tuple[str, int]) -> None:
    """A non-blocking connect to an address literal. Hand-written because uvloop's
    sock_connect resolves even literals and costs about 60 µs per upstream connection."""
    err = sock.connect_ex(target)
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EAGAIN):
        raise OSError(err, os.strerror(err))
    if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) == _ESTABLISHED:
        return  # done already (see `start_connect`)
    loop = asyncio.get_running_loop()
    writable = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _set_done, writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


class SpareSockets:
    """A made, bound and unconnected TCP socket per recent source address, for the next
    connect from it.

    Why: a tunnel's latency is a chain of steps, and making its upstream socket (`socket`,
    three `setsockopt`, `bind` and a Python object) is one of them, between the request
    and the connect. A spare made once the previous tunnel's reply has gone takes that off
    the chain. It has no port until its connect (`IP_BIND_ADDRESS_NO_PORT`, R15), so it
    holds a descriptor and nothing else: at most `KEPT`, none older than `IDLE_SECONDS`
    (a quiet PoP holds none), all closed when the caller says its addresses may have
    changed (`clear`)."""

    KEPT = 64
    IDLE_SECONDS = 0.5

    def __init__(self) -> None:
        self._spares: dict[IPAddress, tuple[socket.socket, SocketOptions, float]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._spares)

    def take(self, source: IPAddress, options: SocketOptions) -> socket.socket:
        """The spare for `source`, made under `options`; else a new socket."""
        spare = self._spares.pop(source, None)
        if spare is not None:
            if spare[1] is options:
                return spare[0]
            spare[0].close()  # made under options since reloaded
        return make_tcp_socket(source, options)

    def refill(self, source: IPAddress, options: SocketOptions) -> None:
        """Make the spare for `source` if there is none: off the client's path, after a
        reply. Never raises: the connect that would take it says what is wrong."""
        if source in self._spares:
            return
        if len(self._spares) >= self.KEPT:
            self._spares.pop(next(iter(self._spares)))[0].close()  # the oldest
        try:
            sock = make_tcp_socket(source, options)
        except (UpstreamError, OSError):  # OSError: `socket` itself (EMFILE, ENOBUFS)
            return
        self._spares[source] = (sock, options, time.monotonic())
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.IDLE_SECONDS, self._expire)

    def _expire(self) -> None:
        self._timer = None
        made_before = time.monotonic() - self.IDLE_SECONDS
        for source in [source for source, spare in self._spares.items() if spare[2] <= made_before]:
            self._spares.pop(source)[0].close()
        if self._spares:
            self._timer = asyncio.get_running_loop().call_later(self.IDLE_SECONDS, self._expire)

    def clear(self) -> None:
        """Close every spare (the source addresses may have changed, or the PoP closes)."""
        for sock, _, _ in self._spares.values():
            sock.close()
        self._spares.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def start_connect(source: IPAddress, address: IPAddress, port: int,
                  options: SocketOptions, spares: SpareSockets | None = None) -> tuple[socket.socket, bool]:
    """Begin a non-blocking connect from `source` to `address:port`, for a caller that
    waits for writability itself (a callback, no task). Returns the socket (the caller's
    from now on) and whether it is already connected; if not, the caller waits until it
    is writable, then calls `connect_outcome`. Raises UpstreamError.

    Speculative, as HAProxy's connection confirmation: a handshake with a peer on this
    host (or one the kernel answers at once) is often complete when `connect` returns, and
    then one `getsockopt` saves the caller a readiness wait (an epoll change and a wake-up,
    some 10-20 µs of latency). Elsewhere it costs that one `getsockopt`.

    `spares`: take the socket from there if it has one for `source`."""
    sock = spares.take(source, options) if spares is not None else make_tcp_socket(source, options)
    err = sock.connect_ex((address_text(address), port))
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        return sock, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) == _ESTABLISHED
    if err:
        sock.close()
        raise _map_connect_error(OSError(err, os.strerror(err)), address, port)
    return sock, True


def connect_outcome(sock: socket.socket, address: IPAddress, port: int) -> UpstreamError | None:
    """After `start_connect`'s socket became writable: None if connected, else the error
    (the caller closes the socket)."""
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as exc:
        return _map_connect_error(exc, address, port)
    return _map_connect_error(OSError(err, os.strerror(err)), address, port) if err else None


def connect_timed_out(address: IPAddress, port: int, connect_timeout: float) -> UpstreamError:
    return UpstreamError(f"connect to {_fmt(address, port)} timed out after {connect_timeout:g} s",
                         status=504, socks_reply=0x04)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fmt(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _map_connect_error(exc: OSError, address: IPAddress, port: int) -> UpstreamError:
    target = _fmt(address, port)
    if exc.errno == errno.ECONNREFUSED:
        return UpstreamError(f"{target} refused the connection", status=502, socks_reply=0x05)
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return UpstreamError(f"{target} is unreachable: {exc.strerror}", status=502, socks_reply=0x03)
    return UpstreamError(f"connect to {target} failed: {exc.strerror or exc}", status=502)


async def happy_eyeballs(
    attempts: Sequence[Callable[[], Awaitable[T]]],
    *,
    delay: float = CONNECTION_ATTEMPT_DELAY_S,
    cleanup: Callable[[T], None],
) -> tuple[T, int]:
    """RFC 8305 §5: start attempts `delay` apart (sooner when one fails); first success wins.

    Results of attempts that succeed after the winner are passed to `cleanup` (so no socket
    leaks), and every task is awaited before returning: nothing is left running.
    """
    if not attempts:
        raise UpstreamError("no address to connect to")
    if len(attempts) == 1:  # nothing to race: skip the task and the timer
        return await attempts[0](), 0
    pending: dict[asyncio.Task[T], int] = {}
    errors: list[BaseException] = []
    winner: tuple[T, int] | None = None
    try:
        for index, attempt in enumerate(attempts):
            pending[asyncio.ensure_future(attempt())] = index
            while pending and winner is None:
                done, _ = await asyncio.wait(pending, timeout=delay,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break  # the attempt delay passed: start the next attempt
                winner = _collect(done, pending, errors, winner, cleanup)
            if winner is not None:
                return winner
        while pending and winner is None:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            winner = _collect(done, pending, errors, winner, cleanup)
        if winner is not None:
            return winner
    finally:
        for task in pending:
            task.cancel()
        for task in list(pending):
            try:
                result = await task
            except BaseException:  # noqa: S112 - losers' errors are irrelevant once decided
                continue
            cleanup(result)
    upstream_errors = [error for error in errors if isinstance(error, UpstreamError)]
    if upstream_errors:
        raise upstream_errors[-1]
    raise UpstreamError(f"all {len(attempts)} connection attempts failed: {errors[-1]}")


def _collect(
    done: set[asyncio.Task[T]],
    pending: dict[asyncio.Task[T], int],
    errors: list[BaseException],
    winner: tuple[T, int] | None,
    cleanup: Callable[[T], None],
) -> tuple[T, int] | None:
    for task in done:
        index = pending.pop(task)
        error = task.exception()
        if error is not None:
            errors.append(error)
        elif winner is None:
            winner = (task.result(), index)
        else:
            cleanup(task.result())
    return winner


def interleave_families(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """RFC 8305 §4: alternate families, starting with IPv6, keeping order within a family."""
    if len(addresses) == 1:  # an address literal, most of the time
        return list(addresses)
    v6 = [address for address in addresses if address.version == 6]
    v4 = [address for address in addresses if address.version == 4]
    ordered: list[IPAddress] = []
    for index in range(max(len(v6), len(v4))):
        if index < len(v6):
            ordered.append(v6[index])
        if index < len(v4):
            ordered.append(v4[index])
    return ordered
