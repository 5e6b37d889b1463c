"""SOCKS5 server side (RFC 1928) with username/password authentication (RFC 1929), sans-I/O.

Devices reach the PoP with SOCKS5 for any TCP flow (CONNECT) and for UDP (UDP
ASSOCIATE). The device must authenticate with username/password: nothing is proxied
for an unauthenticated client (rule R13).

Theory of operation: :class:`Socks5Server` is a state machine driven by two sides. The
client's bytes go in through ``receive_data(data)``, which returns events; the bytes the
machine decides to send on its own (the method selection, a failure reply) are taken
with ``data_to_send()``. The decisions that belong to the caller (are these credentials
valid? could the upstream be reached?) are answered with ``accept_credentials()``,
``reject_credentials()`` and ``reply(...)``, which return the bytes to send. The states
and moves are the table :data:`_TRANSITIONS`; an input that has no row in the current
state is the caller's mistake and raises :class:`Socks5StateError`. Malformed client
input always has a row: it moves to FAILED and yields a :class:`ProtocolFailure` whose
reply (if any) is already in ``data_to_send()``; the caller sends it and closes.

  GREETING --(username/password offered)--> AUTH --(credentials)--> AUTH_DECISION
  AUTH_DECISION --accept--> REQUEST --(request)--> AWAITING_REPLY --reply(0)--> DONE
  any state --(malformed input, reject, failure reply)--> FAILED

Bytes that arrive while the caller decides are buffered and parsed on the next
``receive_data`` call (``receive_data(b"")`` after ``accept_credentials()`` drains a
pipelined request). Bytes after the request belong to the tunnel: ``remainder()``.

Choices where the RFCs leave room, each with a test:
* a version byte other than 5 (or 1 in the RFC 1929 sub-negotiation) gets no reply at
  all, only a close: whatever that peer speaks, a SOCKS5 reply would only confuse it;
* malformed requests (RSV != 0, empty domain, NUL or other invalid byte in the domain,
  port 0 for CONNECT) get 0x01 general failure, not 0x04: nothing was tried, and "host
  unreachable" would send the user looking for a network problem;
* port 0 and address 0.0.0.0 are accepted for UDP ASSOCIATE: RFC 1928 §7 says a client
  that does not yet know its UDP source sends zeros;
* BIND is answered 0x07 command not supported;
* domain names must be ASCII host names (IDNs in punycode); a name that a resolver
  could read as an IPv4 address in a non-dotted-quad notation is refused, and so is an
  IPv6 literal with a zone (``fe80::1%eth0``: it would choose one of the PoP's links).

What it does not know: sockets, timeouts (RFC 1928 asks the server to close within 10 s
of a failure reply: the caller's job), who the credentials belong to, and GSSAPI.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Final

from egressd.protocols.authority import normalize_host
from egressd.protocols.http1_body import ProtocolError
from egressd.protocols.memo import WholeHeads
from egressd.protocols.states import StateEnum

__all__ = [
    "AddressType",
    "Command",
    "CredentialsReceived",
    "Event",
    "Method",
    "MethodSelected",
    "ProtocolError",
    "ProtocolFailure",
    "ReplyCode",
    "RequestReceived",
    "Socks5Server",
    "Socks5State",
    "Socks5StateError",
    "UdpDatagram",
    "build_udp_datagram",
    "encode_address",
    "parse_udp_datagram",
]

SOCKS_VERSION: Final = 5
AUTH_VERSION: Final = 1  # RFC 1929 sub-negotiation
_AUTH_SUCCESS: Final = b"\x01\x00"
_AUTH_FAILURE: Final = b"\x01\x01"


class Method(enum.IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


_SUPPORTED_COMMANDS: Final = {Command.CONNECT.value: Command.CONNECT,
                               Command.UDP_ASSOCIATE.value: Command.UDP_ASSOCIATE}


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class ReplyCode(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5State(StateEnum):
    GREETING = "greeting"  # waiting for VER NMETHODS METHODS
    AUTH = "auth"  # waiting for the RFC 1929 username/password
    AUTH_DECISION = "auth-decision"  # credentials delivered; the caller accepts or rejects
    REQUEST = "request"  # waiting for VER CMD RSV ATYP DST.ADDR DST.PORT
    AWAITING_REPLY = "awaiting-reply"  # request delivered; the caller replies
    DONE = "done"  # success sent: the connection is a tunnel (or a UDP control channel)
    FAILED = "failed"  # terminal: close the connection


class _Input(StateEnum):
    USERNAME_PASSWORD_OFFERED = enum.auto()
    NO_AUTH_OFFERED = enum.auto()  # only with allow_no_auth
    CREDENTIALS = enum.auto()
    ACCEPT = enum.auto()
    REJECT = enum.auto()
    REQUEST = enum.auto()
    REPLY_SUCCESS = enum.auto()
    REPLY_FAILURE = enum.auto()
    MALFORMED = enum.auto()


_St = Socks5State
_In = _Input
#: {state: {input: next state}}. Adding a case is adding a row.
_TRANSITIONS: Final[dict[Socks5State, dict[_Input, Socks5State]]] = {
    _St.GREETING: {
        _In.USERNAME_PASSWORD_OFFERED: _St.AUTH,
        _In.NO_AUTH_OFFERED: _St.REQUEST,
        _In.MALFORMED: _St.FAILED,
    },
    _St.AUTH: {_In.CREDENTIALS: _St.AUTH_DECISION, _In.MALFORMED: _St.FAILED},
    _St.AUTH_DECISION: {_In.ACCEPT: _St.REQUEST, _In.REJECT: _St.FAILED},
    _St.REQUEST: {_In.REQUEST: _St.AWAITING_REPLY, _In.MALFORMED: _St.FAILED},
    _St.AWAITING_REPLY: {_In.REPLY_SUCCESS: _St.DONE, _In.REPLY_FAILURE: _St.FAILED},
    _St.DONE: {},
    _St.FAILED: {},
}


class Socks5StateError(RuntimeError):
    """The caller asked for something the current state does not allow (a bug)."""


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodSelected:
    method: Method


@dataclass(frozen=True, slots=True)
class CredentialsReceived:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """``host`` is the IP address string for IPv4/IPv6 address types, else the domain."""

    command: Command
    host: str
    port: int
    address_type: AddressType


@dataclass(frozen=True, slots=True)
class ProtocolFailure:
    """The client broke the protocol. ``reply_code`` is set when a reply carries one."""

    reply_code: ReplyCode | None
    message: str


Event = MethodSelected | CredentialsReceived | RequestReceived | ProtocolFailure


# --- addresses -------------------------------------------------------------------------


class _BadAddress(Exception):
    def __init__(self, code: ReplyCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _decode_domain(raw: bytes) -> str | None:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if ":" in text:  # an IPv6 literal sent as a name
        if "%" in text:  # a zone (fe80::1%eth0) would pick one of the PoP's interfaces
            return None
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            return None
    return normalize_host(text)


def _read_address(buf: bytes | bytearray, offset: int) -> tuple[AddressType, str, int, int] | None:
    """(type, host, port, end) of the ATYP ADDR PORT at ``buf[offset:]``; None if incomplete.

    Raises :class:`_BadAddress` as soon as the bytes cannot be a valid address.
    """
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    if atyp == AddressType.IPV4:
        start, end = offset + 1, offset + 1 + 4 + 2
    elif atyp == AddressType.IPV6:
        start, end = offset + 1, offset + 1 + 16 + 2
    elif atyp == AddressType.DOMAIN:
        if len(buf) <= offset + 1:
            return None
        if buf[offset + 1] == 0:
            raise _BadAddress(ReplyCode.GENERAL_FAILURE, "empty domain name")
        start, end = offset + 2, offset + 2 + buf[offset + 1] + 2
    else:
        raise _BadAddress(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, f"unknown address type {atyp}")
    if len(buf) < end:
        return None
    raw = bytes(buf[start : end - 2])
    port = int.from_bytes(buf[end - 2 : end], "big")
    if atyp == AddressType.IPV4:
        return AddressType.IPV4, socket.inet_ntoa(raw), port, end  # as ipaddress, 5x faster
    if atyp == AddressType.IPV6:
        return AddressType.IPV6, str(ipaddress.IPv6Address(raw)), port, end
    host = _decode_domain(raw)
    if host is None:
        raise _BadAddress(ReplyCode.GENERAL_FAILURE, "invalid domain name")
    return AddressType.DOMAIN, host, port, end


def encode_address(host: str, port: int) -> bytes:
    """ATYP ADDR PORT for an IP address string or a domain name."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    try:  # a dotted quad (the usual BND.ADDR) without building an ipaddress object
        return bytes([AddressType.IPV4]) + socket.inet_pton(socket.AF_INET, host) + port.to_bytes(2, "big")
    except OSError:
        pass
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"domain name must be 1-255 bytes: {host!r}") from None
        encoded = bytes([AddressType.DOMAIN, len(name)]) + name
    else:
        atyp = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
        encoded = bytes([atyp]) + address.packed
    return encoded + port.to_bytes(2, "big")


# --- the TCP dialogue ------------------------------------------------------------------

#: Messages by their bytes and the (state, allow_no_auth) they were parsed in: the state
#: after them, their events (frozen: safe to share) and the bytes they made the server send.
_KNOWN_MESSAGES: WholeHeads[tuple[Socks5State, tuple[Event, ...], bytes]] = WholeHeads()


class Socks5Server:
    """One SOCKS5 control connection, server side.

    >>> server = Socks5Server()
    >>> events = server.receive_data(data)   # MethodSelected, CredentialsReceived, ...
    >>> send(server.data_to_send())          # after every receive_data
    >>> send(server.accept_credentials())    # then server.receive_data(b"")
    >>> send(server.reply(ReplyCode.SUCCEEDED, "192.0.2.1", 40000))
    >>> tunnel_data = server.remainder()

    ``allow_no_auth`` accepts method 0x00 when the client does not offer 0x02 (for a
    listener on loopback only; a PoP never sets it). ``max_buffer`` bounds the bytes
    held while the caller decides (stop reading from the socket meanwhile).
    """

    def __init__(self, *, allow_no_auth: bool = False, max_buffer: int = 64 * 1024) -> None:
        self._allow_no_auth = allow_no_auth
        self._max_buffer = max_buffer
        self._state = Socks5State.GREETING
        self._buf = bytearray()
        self._out = bytearray()

    @property
    def state(self) -> Socks5State:
        return self._state

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the client; the events they complete (never raises for bad input)."""
        if self._state is _St.FAILED:
            return []
        if self._state is _St.DONE:
            raise Socks5StateError("the dialogue is over: the bytes belong to the tunnel")
        if self._buf or not data or type(data) is not bytes:
            return self._receive(data)
        # A message that was all of a read, in a state it was seen in before: its events,
        # output and next state are those of last time (a device repeats its greeting,
        # credentials and request on every connection). Only clean parses are remembered.
        setting = (self._state, self._allow_no_auth)
        known = _KNOWN_MESSAGES.get(data, setting)
        if known is not None:
            self._state = known[0]
            if known[2]:
                self._out += known[2]
            return list(known[1])
        out_before = len(self._out)
        events = self._receive(data)
        if events and not self._buf and not any(isinstance(event, ProtocolFailure) for event in events):
            _KNOWN_MESSAGES.put(data, setting, (self._state, tuple(events), bytes(self._out[out_before:])))
        return events

    def _receive(self, data: bytes | bytearray) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            state = self._state
            if state is _St.GREETING:
                event = self._parse_greeting()
            elif state is _St.AUTH:
                event = self._parse_auth()
            elif state is _St.REQUEST:
                event = self._parse_request()
            else:
                if len(self._buf) > self._max_buffer:  # FAILED has an empty buffer
                    self._state = _St.FAILED
                    events.append(ProtocolFailure(None, "too much data before the reply"))
                return events
            if event is None:
                return events
            events.append(event)

    def data_to_send(self) -> bytes:
        """Take the bytes the machine produced on its own (method choice, failure reply)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def accept_credentials(self) -> bytes:
        """RFC 1929 success; then call ``receive_data`` (``b""`` drains a buffered request)."""
        self._transition(_In.ACCEPT)
        return _AUTH_SUCCESS

    def reject_credentials(self) -> bytes:
        """RFC 1929 failure (status 0x01); close the connection after sending it."""
        self._transition(_In.REJECT)
        return _AUTH_FAILURE

    def reply(self, code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """The reply to the request. SUCCEEDED -> DONE (tunnel); anything else -> FAILED.

        For CONNECT, BND is the upstream socket's local address; for UDP ASSOCIATE it is
        where the client must send its datagrams.
        """
        encoded = encode_address(bind_host, bind_port)
        if not isinstance(code, ReplyCode):  # calling the enum costs two Python calls
            code = ReplyCode(code)
        self._transition(_In.REPLY_SUCCESS if code is ReplyCode.SUCCEEDED else _In.REPLY_FAILURE)
        return bytes([SOCKS_VERSION, code, 0]) + encoded

    def remainder(self) -> bytes:
        """Take the bytes received after the request (the start of the tunnel)."""
        if self._state not in (_St.AWAITING_REPLY, _St.DONE):
            raise Socks5StateError(f"no request has been received (state {self._state.value})")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # -- internals ------------------------------------------------------------------

    def _transition(self, event: _Input) -> None:
        next_state = _TRANSITIONS[self._state].get(event)
        if next_state is None:
            raise Socks5StateError(f"{event.name} is not allowed in state {self._state.value}")
        self._state = next_state

    def _fail(self, code: ReplyCode | None, message: str, reply: bytes) -> ProtocolFailure:
        self._transition(_In.MALFORMED)
        self._buf.clear()
        self._out += reply
        return ProtocolFailure(code, message)

    def _fail_request(self, code: ReplyCode, message: str) -> ProtocolFailure:
        return self._fail(code, message, self._reply_bytes(code))

    @staticmethod
    def _reply_bytes(code: ReplyCode) -> bytes:
        return bytes([SOCKS_VERSION, code, 0]) + encode_address("0.0.0.0", 0)

    def _parse_greeting(self) -> Event | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            return self._fail(None, f"not SOCKS5 (version byte {buf[0]})", b"")
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            return self._fail(None, "no authentication method offered", b"\x05\xff")
        if len(buf) < 2 + count:
            return None
        methods = bytes(buf[2 : 2 + count])
        del buf[: 2 + count]
        if Method.USERNAME_PASSWORD in methods:
            self._transition(_In.USERNAME_PASSWORD_OFFERED)
            self._out += bytes([SOCKS_VERSION, Method.USERNAME_PASSWORD])
            return MethodSelected(Method.USERNAME_PASSWORD)
        if self._allow_no_auth and Method.NO_AUTH in methods:
            self._transition(_In.NO_AUTH_OFFERED)
            self._out += bytes([SOCKS_VERSION, Method.NO_AUTH])
            return MethodSelected(Method.NO_AUTH)
        return self._fail(None, "username/password authentication not offered", b"\x05\xff")

    def _parse_auth(self) -> Event | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] != AUTH_VERSION:
            return self._fail(None, f"username/password version {buf[0]} is not 1", b"")
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if ulen == 0:
            return self._fail(None, "empty username", _AUTH_FAILURE)
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        if plen == 0:
            return self._fail(None, "empty password", _AUTH_FAILURE)
        end = 3 + ulen + plen
        if len(buf) < end:
            return None
        try:
            username = buf[2 : 2 + ulen].decode("utf-8")
            password = buf[3 + ulen : end].decode("utf-8")
        except UnicodeDecodeError:
            return self._fail(None, "username or password is not UTF-8", _AUTH_FAILURE)
        del buf[:end]
        self._transition(_In.CREDENTIALS)
        return CredentialsReceived(username, password)

    def _parse_request(self) -> Event | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            return self._fail(None, f"request version {buf[0]} is not 5", b"")
        if len(buf) < 2:
            return None
        command = _SUPPORTED_COMMANDS.get(buf[1])  # a dict: calling an enum is two Python calls
        if command is None:
            return self._fail_request(
                ReplyCode.COMMAND_NOT_SUPPORTED, f"command {buf[1]} not supported"
            )
        if len(buf) < 3:
            return None
        if buf[2] != 0:
            return self._fail_request(ReplyCode.GENERAL_FAILURE, "reserved byte is not 0")
        try:
            address = _read_address(buf, 3)
        except _BadAddress as error:
            return self._fail_request(error.code, error.message)
        if address is None:
            return None
        address_type, host, port, end = address
        if port == 0 and command is Command.CONNECT:
            return self._fail_request(ReplyCode.GENERAL_FAILURE, "destination port 0")
        del buf[:end]
        self._transition(_In.REQUEST)
        return RequestReceived(command, host, port, address_type)


# --- UDP datagrams (RFC 1928 §7) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One client datagram: destination and payload. Fragments must be dropped."""

    frag: int
    host: str
    port: int
    address_type: AddressType
    payload: bytes

    @property
    def is_fragment(self) -> bool:
        """FRAG != 0: part of a fragmented datagram, which egressd does not reassemble."""
        return self.frag != 0


def parse_udp_datagram(data: bytes | bytearray) -> UdpDatagram:
    """Parse ``RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA``; raises :class:`ProtocolError`."""
    if len(data) < 4:
        raise ProtocolError("truncated SOCKS5 UDP header")
    if data[0] != 0 or data[1] != 0:
        raise ProtocolError("SOCKS5 UDP header: reserved bytes are not 0")
    try:
        address = _read_address(data, 3)
    except _BadAddress as error:
        raise ProtocolError(f"SOCKS5 UDP header: {error.message}") from None
    if address is None:
        raise ProtocolError("truncated SOCKS5 UDP header")
    address_type, host, port, end = address
    if port == 0:
        raise ProtocolError("SOCKS5 UDP header: destination port 0")
    return UdpDatagram(data[2], host, port, address_type, bytes(data[end:]))


def build_udp_datagram(host: str, port: int, payload: bytes, *, frag: int = 0) -> bytes:
    """The header and payload of a datagram sent to the client (``host`` as source)."""
    if not 0 <= frag <= 255:
        raise ValueError(f"frag out of range: {frag}")
    return bytes([0, 0, frag]) + encode_address(host, port) + payload
