"""`egressd verify` (R12): fetch the echo's trace through the gateway, once per family, and
say whether the flow left from the account's dedicated addresses.

`judge` is the pure part: a family's observation (source address, connected and egress
PoP, city, or why there was no path) against the account as the control plane describes
it to the device (`GET /v1/device`), giving one `FamilyResult` with a plain sentence.
The I/O part fetches `GET /trace` as one tunnel (HTTP CONNECT through the running
client's local proxy, or a device-link stream straight to a PoP) and the account view.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from egressd.client.attach import Attachment, NoPopReachable
from egressd.mux import MuxError, StreamRefused
from egressd.protocols.geofeed import GeofeedIndex

__all__ = ["FamilyResult", "Observation", "judge", "missing_path", "parse_trace", "summary"]

Family = Literal[4, 6]
FETCH_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Observation:
    """What one family's fetch saw."""

    family: Family
    connected_pop: str | None = None
    egress_pop: str | None = None  # as the PoP reported it, when it did
    source: str | None = None  # the address the echo saw
    city: str | None = None  # the echo's geolocation of it
    error: str | None = None  # no path: why


@dataclass(slots=True)
class FamilyResult:
    family: Family
    ok: bool
    message: str
    connected_pop: str | None = None
    egress_pop: str | None = None
    source: str | None = None
    city: str | None = None
    expected: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_trace(body: str) -> dict[str, str]:
    """The echo's ``key=value`` lines."""
    fields: dict[str, str] = {}
    for line in body.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            fields[key.strip()] = value.strip()
    return fields


def missing_path(family: Family, reason: str) -> str:
    return f"missing IPv{family} path: {reason}"


def _in(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str | None) -> bool:
    if not text:
        return False
    try:
        return address in ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False


def _shared_pop(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                device: dict[str, Any]) -> str | None:
    for pop in device.get("pops", []):
        if any(_in(address, shared) for shared in pop.get("shared", [])):
            return str(pop["code"])
    return None


def judge(seen: Observation, device: dict[str, Any], geofeed: GeofeedIndex | None = None) -> FamilyResult:
    """One family's verdict against the account (`GET /v1/device`'s answer)."""
    family = seen.family
    name = f"IPv{family}"
    active = [loc for loc in device.get("locations", []) if loc.get("state") == "active"]
    field_name = "ipv4" if family == 4 else "ipv6"
    expected = [str(loc[field_name]) for loc in active if loc.get(field_name)]
    dedicated_on = device.get("dedicated", {}).get("status") == "active"
    result = FamilyResult(family, False, "", seen.connected_pop, seen.egress_pop, seen.source,
                          seen.city, expected if dedicated_on else [])
    if seen.error is not None or seen.source is None:
        result.message = missing_path(family, seen.error or "the echo did not answer")
        return result
    try:
        address = ipaddress.ip_address(seen.source)
    except ValueError:
        result.message = f"{name}: the echo answered with {seen.source!r}, not an address"
        return result
    if address.version != family:
        result.message = missing_path(family, f"the {name} echo saw the flow arrive over "
                                      f"IPv{address.version} from {address}")
        return result
    if result.city is None and geofeed is not None:
        entry = geofeed.lookup(address)
        result.city = entry.city if entry is not None else None
    owner = next((loc for loc in active if _in(address, loc.get(field_name))), None)
    shared_at = _shared_pop(address, device)
    if owner is not None:
        home = str(owner.get("pop"))
        result.egress_pop = result.egress_pop or (home if family == 4 else seen.connected_pop)
        if family == 4 and result.egress_pop != home:
            result.message = (f"{name} left from {address}, dedicated location {owner['id']} "
                              f"of {home}, but from PoP {result.egress_pop} (R7: it lives at {home})")
            return result
        if not dedicated_on:
            result.message = (f"{name} left from {address} of location {owner['id']}, but the "
                              f"account's dedicated egress is not active: {device['dedicated']['detail']}")
            return result
        result.ok = True
        result.message = (f"{name} left from dedicated address {address} "
                          f"(location {owner['id']}, {owner.get('city', '?')})")
        return result
    if shared_at is None:
        result.message = (f"{name} left from {address}, which is neither a dedicated address of "
                          f"account {device.get('account_id')} nor a PoP's shared address")
        return result
    result.egress_pop = result.egress_pop or shared_at
    network = device.get("network", {})
    plan = device.get("plan", "?")
    if not dedicated_on:
        why = ("the account has no dedicated egress" if not device.get("locations")
               else f"its dedicated egress is not active: {device['dedicated']['detail']}")
        result.message = f"{name} left from a shared address: {why} (plan {plan})"
    elif not network.get("proxy_tcp", True):
        result.message = f"{name} left from a shared address: proxy.tcp is off for this account"
    else:
        result.message = (f"{name} left from a shared address of {shared_at}: an egress policy "
                          "with action shared chose it, or fallback=shared during a failover")
    return result


def summary(results: list[FamilyResult]) -> bool:
    return bool(results) and all(result.ok for result in results)


# --- fetching --------------------------------------------------------------------------


def echo_target(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an http:// echo URL; ValueError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: an echo URL is http://HOST[:PORT]/trace")
    return parts.hostname, parts.port or 80, parts.path or "/trace"


def trace_request(host: str, port: int, path: str) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: egressd-verify\r\n"
            "Connection: close\r\n\r\n").encode("ascii")


def trace_body(response: bytes) -> str:
    """The body of the echo's answer; ValueError on anything but a 200."""
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        raise ValueError(f"the echo answered {status_line!r}")
    return body.decode("utf-8", "replace")


async def through_local_proxy(proxy: tuple[str, int], url: str, family: Family) -> Observation:
    """GET the trace as a CONNECT tunnel through the running client's local proxy."""
    try:
        host, port, path = echo_target(url)
    except ValueError as error:
        return Observation(family, error=str(error))
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            reader, writer = await asyncio.open_connection(*proxy)
            try:
                authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                if " 200 " not in lines[0] + " ":
                    body = await reader.read(4096)
                    reason = body.decode("utf-8", "replace").strip() or lines[0]
                    return Observation(family, error=f"the gateway refused {url}: {reason}")
                fields = {k.strip().lower(): v.strip() for k, _, v in
                          (line.partition(":") for line in lines[1:] if ":" in line)}
                writer.write(trace_request(host, port, path))
                response = await reader.read(-1)
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
        return Observation(family, error=f"cannot fetch {url} through the local proxy "
                           f"{proxy[0]}:{proxy[1]}: {error or type(error).__name__}")
    return _observed(family, url, response, fields.get("egressd-connected-pop"),
                     fields.get("egressd-egress-pop"))


def _observed(family: Family, url: str, response: bytes, connected: str | None,
              egress: str | None) -> Observation:
    try:
        trace = parse_trace(trace_body(response))
    except ValueError as error:
        return Observation(family, connected, egress, error=f"{url}: {error}")
    return Observation(family, connected, egress, trace.get("ip"), trace.get("city"))


async def through_device_link(attachment: Attachment, url: str, family: Family) -> Observation:
    """GET the trace as one stream of a device link straight to the attached PoP."""
    try:
        host, port, path = echo_target(url)
    except ValueError as error:
        return Observation(family, error=str(error))
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            flow = await attachment.open_tcp(host, port)
            try:
                await flow.stream.write(trace_request(host, port, path))
                while data := await flow.stream.read():
                    chunks.append(data)
            finally:
                flow.stream.release()
    except StreamRefused as refused:
        return Observation(family, attachment.connected,
                           error=f"the gateway refused {url}: {refused.status} {refused.reason}")
    except (MuxError, NoPopReachable, TimeoutError) as error:
        return Observation(family, attachment.connected,
                           error=f"cannot fetch {url}: {error or type(error).__name__}")
    return _observed(family, url, b"".join(chunks), flow.connected_pop, flow.egress_pop)
