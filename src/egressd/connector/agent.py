"""The tunnel connector: links to the two nearest PoPs, each one a reverse mux link.

The private network accepts no inbound connections, so the connector dials out (TLS, the
PoP's certificate checked against the deployment CA) and then serves HTTP/2 on the
connection (`egressd.mux.reverse`): the PoP opens the hello stream, to which the
connector answers with its token and its announced routes, and reads the PoP's verdict
back; every later stream is a flow, which the connector opens from its own host, after
checking that the destination is one the PoP accepted (a PoP cannot use the connector to
reach anything else in the private network).

Redundancy: ``links`` slots (two by default) each hold a link to a different PoP, chosen
by measured RTT (TCP connect time, the best of three). A slot whose link ends moves to
the best PoP not held by another slot, with exponential backoff per PoP; the other slot
keeps carrying flows meanwhile. The link is pinged every 2 s, so a silent PoP is left
within ~5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

from egressd.mux import MuxError, MuxStream, pump
from egressd.mux.reverse import ServedLink, dial_reverse
from egressd.protocols.tunnel import (
    FLOW,
    HELLO,
    MAX_VERDICT,
    ROUTES_HEADER,
    TOKEN_HEADER,
    Announcement,
    Verdict,
    host_matches,
    parse_routes,
)

__all__ = ["ConnectorAgent", "ConnectorSettings", "PopAddress", "parse_pop"]

log = logging.getLogger("egressd.connector")

PING_EVERY: Final = 2.0
PING_WAIT: Final = 3.0
STABLE_AFTER: Final = 10.0  # a link that lived this long resets its PoP's backoff
LIST_EVERY: Final = 10.0  # seconds between PoP lists from the control plane


@dataclass(frozen=True, slots=True)
class PopAddress:
    """Where a PoP accepts connectors; ``name`` is what its certificate must show."""

    host: str
    port: int
    name: str

    def __str__(self) -> str:
        return self.name if self.name != self.host else f"{self.host}:{self.port}"


def parse_pop(text: str) -> PopAddress:
    """``[NAME@]HOST:PORT`` (``[v6]:PORT`` for IPv6); NAME defaults to HOST."""
    name, _, address = text.rpartition("@")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected [NAME@]HOST:PORT")
    return PopAddress(host, int(port), name or host)


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    token: str = field(repr=False)
    pops: tuple[PopAddress, ...]
    ca: Path
    routes: Announcement = field(default_factory=Announcement)
    links: int = 2
    connect_timeout: float = 10.0
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    control: str | None = None  # control plane URL: the PoP list comes from there too
    control_ca: Path | None = None


@dataclass
class LinkState:
    """One PoP link as the connector sees it (status and the routes the PoP accepted)."""

    pop: PopAddress
    accepted: Announcement = field(default_factory=Announcement)
    attached: bool = False
    verdict: asyncio.Future[Verdict] | None = None

    def covers(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(host_matches(pattern, host) for pattern in self.accepted.hostnames)
        return any(address in network for network in self.accepted.networks)


class ConnectorAgent:
    """Runs until cancelled; ``attached`` lists the PoPs it holds links to now."""

    def __init__(self, settings: ConnectorSettings) -> None:
        if not settings.pops and not settings.control:
            raise ValueError("no PoP to dial (give --pop or --control)")
        self.settings = settings
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.set_alpn_protocols(["h2"])
        self.links: dict[PopAddress, LinkState] = {}
        self.refused = 0  # verdicts that refused us (wrong token, bad announcement)
        self._retry_at: dict[PopAddress, float] = {}
        self._backoff: dict[PopAddress, float] = {}
        self._listed: tuple[PopAddress, ...] = ()  # from the control plane
        self._stranded = False  # said once that no PoP is reachable
        self._listed_at = -math.inf

    @property
    def attached(self) -> list[str]:
        return sorted(str(state.pop) for state in self.links.values() if state.attached)

    async def run(self) -> None:
        slots = self.settings.links if self.settings.control else min(
            self.settings.links, len(self.settings.pops))
        async with asyncio.TaskGroup() as group:
            for index in range(slots):
                group.create_task(self._slot(index), name=f"connector slot {index}")

    # --- choosing PoPs ------------------------------------------------------------

    async def ranked(self) -> list[tuple[float, PopAddress]]:
        """Reachable PoPs by TCP connect time (best of three), fastest first."""
        pops = list(dict.fromkeys(self.settings.pops + await self.listed()))
        times = await asyncio.gather(*(self._rtt(pop) for pop in pops))
        return sorted(((rtt, pop) for rtt, pop in zip(times, pops, strict=True)
                       if rtt is not None), key=lambda item: (item[0], str(item[1])))

    async def listed(self) -> tuple[PopAddress, ...]:
        """The PoPs the control plane lists for this connector (refreshed at most every
        `LIST_EVERY` seconds; the last good list while the control plane is away)."""
        control = self.settings.control
        if control is None or time.monotonic() - self._listed_at < LIST_EVERY:
            return self._listed
        self._listed_at = time.monotonic()
        verify: ssl.SSLContext | bool = True
        if self.settings.control_ca is not None:
            verify = ssl.create_default_context(cafile=str(self.settings.control_ca))
        try:
            async with httpx.AsyncClient(timeout=5.0, verify=verify, trust_env=False) as client:
                response = await client.get(
                    f"{control.rstrip('/')}/v1/tunnel/pops",
                    headers={"Authorization": f"Bearer {self.settings.token}"})
            if response.status_code == 401:
                log.error("connector: the control plane refused the token: %s",
                          response.json().get("detail", "401"))
                return self._listed
            response.raise_for_status()
            listed = []
            for item in response.json():
                listed.append(parse_pop(str(item["address"])))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            log.warning("connector: cannot list PoPs at %s: %s", control, error or type(error).__name__)
            return self._listed
        if tuple(listed) != self._listed:
            log.info("connector: the control plane lists PoPs %s",
                     ", ".join(f"{pop} ({pop.host}:{pop.port})" for pop in listed) or "none")
        self._listed = tuple(listed)
        return self._listed

    async def _rtt(self, pop: PopAddress) -> float | None:
        best: float | None = None
        for _ in range(3):
            started = time.perf_counter()
            try:
                async with asyncio.timeout(2.0):
                    _reader, writer = await asyncio.open_connection(pop.host, pop.port)
            except (OSError, TimeoutError):
                return best
            elapsed = time.perf_counter() - started
            writer.transport.abort()
            best = elapsed if best is None else min(best, elapsed)
        return best

    async def _slot(self, index: int) -> None:
        while True:
            now = time.monotonic()
            choice = None
            for rtt, pop in await self.ranked():
                if pop not in self.links and self._retry_at.get(pop, 0.0) <= now:
                    choice = pop
                    log.info("connector: link %d to PoP %s (RTT %.2f ms)", index, pop, rtt * 1000)
                    break
            if choice is None:
                if not self.links and not self._stranded:
                    self._stranded = True
                    log.warning("connector: no PoP reachable now; trying again")
                await asyncio.sleep(self.settings.backoff_min)
                continue
            self._stranded = False
            state = self.links[choice] = LinkState(choice)
            started = time.monotonic()
            try:
                await self._hold(state)
            finally:
                self.links.pop(choice, None)
            backoff = self._backoff.get(choice, 0.0)
            if time.monotonic() - started >= STABLE_AFTER:
                backoff = 0.0
            backoff = min(self.settings.backoff_max, max(self.settings.backoff_min, backoff * 2))
            self._backoff[choice] = backoff
            self._retry_at[choice] = time.monotonic() + backoff
            log.info("connector: PoP %s again in %.1f s at the earliest", choice, backoff)

    # --- one link -----------------------------------------------------------------

    async def _hold(self, state: LinkState) -> None:
        settings = self.settings
        state.verdict = asyncio.get_running_loop().create_future()
        try:
            served = await dial_reverse(
                state.pop.host, state.pop.port, self.context,
                lambda stream: self._handle(state, stream),
                server_hostname=state.pop.name, connect_timeout=settings.connect_timeout)
        except MuxError as error:
            log.warning("connector: PoP %s: %s", state.pop, error)
            return
        try:
            try:
                async with asyncio.timeout(settings.connect_timeout):
                    verdict = await asyncio.shield(state.verdict)
            except (TimeoutError, MuxError) as error:
                log.warning("connector: PoP %s sent no verdict: %s", state.pop,
                            error or "timeout")
                return
            if not verdict.accepted:
                self.refused += 1
                log.error("connector: PoP %s refused the connector: %s", state.pop, verdict.error)
                return
            for route, reason in verdict.refused:
                log.error("connector: PoP %s refused route %s: %s", state.pop, route, reason)
            log.info("connector: attached to PoP %s as %s (account %s), routes %s", verdict.pop,
                     verdict.connector, verdict.account, ", ".join(verdict.routes) or "none")
            state.attached = True
            await self._watch(state, served)
        finally:
            state.attached = False
            if not state.verdict.done():
                state.verdict.cancel()
            await served.close()

    async def _watch(self, state: LinkState, served: ServedLink) -> None:
        while not served.closed.done():
            try:
                await served.ping(PING_WAIT)
            except MuxError as error:
                log.warning("connector: link to PoP %s lost: %s", state.pop, error)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PING_EVERY):
                    await asyncio.shield(served.closed)
        log.warning("connector: link to PoP %s closed (%s)", state.pop,
                    served.link.core.closed_reason or "by the peer")

    async def _handle(self, state: LinkState, stream: MuxStream) -> None:
        protocol = stream.headers.get(":protocol", "")
        if protocol == HELLO:
            await self._hello(state, stream)
        elif protocol == FLOW:
            await self._flow(state, stream)
        else:
            await stream.refuse(501, f"protocol {protocol[:40]!r} is not carried")

    async def _hello(self, state: LinkState, stream: MuxStream) -> None:
        await stream.accept({TOKEN_HEADER: self.settings.token,
                             ROUTES_HEADER: self.settings.routes.header()})
        buffer = b""
        while True:
            data = await stream.read()
            if not data:
                return
            buffer += data
            if len(buffer) > MAX_VERDICT:
                raise MuxError("verdict too long")
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    verdict = Verdict.decode(line)
                except ValueError as error:
                    failure = MuxError(f"PoP {state.pop}: {error}")
                    if state.verdict is not None and not state.verdict.done():
                        state.verdict.set_exception(failure)
                    raise failure from None
                if state.verdict is not None and not state.verdict.done():
                    if verdict.accepted:
                        state.accepted = parse_routes(",".join(verdict.routes))
                    state.verdict.set_result(verdict)
                elif not verdict.accepted:  # a later word: deleted, token replaced
                    log.error("connector: PoP %s: %s", state.pop, verdict.error)
                    state.attached = False
                    return
                else:  # the configuration changed: the routes the PoP carries now
                    state.accepted = parse_routes(",".join(verdict.routes))
                    log.info("connector: PoP %s now carries routes %s", state.pop,
                             ", ".join(verdict.routes) or "none")

    async def _flow(self, state: LinkState, stream: MuxStream) -> None:
        host = stream.headers.get("egressd-host", "")
        flow_id = stream.headers.get("egressd-flow", "?")[:80]
        try:
            port = int(stream.headers.get("egressd-port", ""))
        except ValueError:
            port = 0
        if not state.attached or not 1 <= port <= 65535 or not state.covers(host):
            log.warning("connector: flow %s to %r port %d refused: not an accepted route",
                        flow_id, host[:100], port)
            await stream.refuse(403, f"{host[:100]} is not a route this connector announced")
            return
        try:
            sock = await self._connect(host, port)
        except OSError as error:
            reason = f"cannot reach {host}:{port} from the connector: {error.strerror or error}"
            log.info("connector: flow %s: %s", flow_id, reason)
            await stream.refuse(502, reason)
            return
        try:
            local = sock.getsockname()
            await stream.accept({"egressd-local": f"{local[0]}:{local[1]}"})
            up, down = await pump(stream, sock)
            log.debug("connector: flow %s to %s:%d done (%d up, %d down)", flow_id, host, port,
                      up, down)
        except MuxError as error:
            log.info("connector: flow %s to %s:%d ended: %s", flow_id, host, port, error)
        finally:
            sock.close()

    async def _connect(self, host: str, port: int) -> socket.socket:
        """A connected socket to ``host`` (a name is resolved here, inside the network)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _name, address in _order(infos):
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    await loop.sock_connect(sock, address)
                return sock
            except TimeoutError:
                sock.close()
                last = OSError(f"no answer within {self.settings.connect_timeout:g} s")
            except OSError as error:
                sock.close()
                last = error
            except BaseException:
                sock.close()
                raise
        raise last


def _order(infos: Sequence[tuple[int, int, int, str, tuple[object, ...]]]) -> list[
        tuple[int, int, int, str, tuple[object, ...]]]:
    """Addresses as the resolver returned them, IPv6 and IPv4 alternating (RFC 8305)."""
    v6 = [info for info in infos if info[0] == socket.AF_INET6]
    v4 = [info for info in infos if info[0] != socket.AF_INET6]
    ordered: list[tuple[int, int, int, str, tuple[object, ...]]] = []
    for index in range(max(len(v6), len(v4))):
        ordered.extend(group[index] for group in (v6, v4) if index < len(group))
    return ordered
