"""Hosts and authorities as a proxy must read them: strictly, and never an address filter's
blind spot (RFC 3986 §3.2.2, RFC 9110 §4.2, RFC 1123 host names).

Shared by the HTTP heads (request targets, Host, CONNECT) and SOCKS5 (domain names).
Pure functions; an authority is parsed once per distinct value (an LRU), which is safe
because the result depends on nothing else and the input length is bounded first.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Final

__all__ = ["format_authority", "normalize_host", "parse_authority"]

_HOSTNAME: Final = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*\.?")
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: A dotted-quad IPv4 address as `ipaddress` accepts it (no leading zeros), 20x faster.
_DOTTED_QUAD: Final = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
_NUMERIC_LABEL: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT: Final = re.compile(r"[1-9][0-9]{0,4}")


def normalize_host(host: str) -> str | None:
    """``host`` lower-cased if it is a DNS name or a dotted-quad IPv4 address, else None.

    Names a resolver might read as an IPv4 address in another notation (``0x7f.1``,
    ``2130706433``, ``127.1``, ``0177.0.0.1``) are refused: they are a classic way past
    address filters (SSRF). A name whose last label is numeric must be a dotted quad.
    Bracketed IPv6 literals are handled by :func:`parse_authority`.
    """
    lowered = host.lower()
    if _HOSTNAME.fullmatch(lowered) is None:
        return None
    name = lowered[:-1] if lowered.endswith(".") else lowered
    if len(name) > 253:
        return None
    if _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]) is not None:
        # A dotted quad only: no leading zeros, no short forms, no trailing dot.
        return lowered if _DOTTED_QUAD.fullmatch(lowered) is not None else None
    return lowered


def _parse_port(text: str) -> int | None:
    if _PORT.fullmatch(text) is None:  # digits only, no sign, no leading zero, not 0
        return None
    port = int(text)
    return port if port <= 65535 else None


#: No valid authority is longer: a 253-byte name, its trailing dot and ":65535".
_MAX_AUTHORITY: Final = 260


def parse_authority(authority: str, *, default_port: int | None) -> tuple[str, int] | None:
    """``host[:port]`` -> (normalized host, port), or None if invalid.

    IPv6 literals come in brackets and are returned without them, in canonical form;
    zone identifiers and IPvFuture are refused. ``default_port=None`` makes the port
    mandatory (CONNECT). Ports are 1-65535 written without sign or leading zeros.
    """
    if len(authority) > _MAX_AUTHORITY:
        return None  # also keeps the cache below small
    return _parse_authority(authority, default_port)


@functools.lru_cache(maxsize=4096)  # pure; the same few authorities come again and again
def _parse_authority(authority: str, default_port: int | None) -> tuple[str, int] | None:
    if authority.startswith("["):
        close = authority.find("]")
        literal, rest = authority[1:close], authority[close + 1 :]
        if close < 0 or "%" in literal:
            return None
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            return None
    else:
        name, colon, port_text = authority.partition(":")
        normalized = normalize_host(name)
        if normalized is None:
            return None
        host, rest = normalized, colon + port_text
    if not rest:
        return None if default_port is None else (host, default_port)
    port = _parse_port(rest[1:]) if rest[0] == ":" else None
    return None if port is None else (host, port)


def format_authority(host: str, port: int, default_port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default_port else f"{shown}:{port}"
