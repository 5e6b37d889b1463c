"""Which PoP the device is attached to, and the one connection that carries its flows.

`Attachment` keeps a device link (`egressd.mux.MuxClient`: TLS 1.3 + HTTP/2) per PoP it
has measured. It measures the RTT to every PoP (HTTP/2 PING, best of a few), attaches to
the fastest (the stand-in for anycast), and then pings the connected PoP twice a second:
a PoP that fails a ping or does not answer within `dead_after` (1.5 s) is dead, its link
is dropped and the next fastest takes over, so a dead PoP is left within 3 s. Every
`remeasure` seconds all PoPs are measured again; the client moves only when another PoP
is clearly faster (hysteresis), and flows in progress keep their old link until they end.

Each flow is one extended CONNECT stream (`connect-tcp`, MASQUE path) with the device
credential; its answer says the connected and egress PoP, kept for `status`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from egressd.client.state import Enrollment, PopEndpoint
from egressd.mux import MuxClient, MuxError, MuxStream, StreamRefused
from egressd.protocols.masque import PROTOCOL_TCP, PROTOCOL_UDP, basic_authorization, target_path

__all__ = ["Attachment", "FlowOpened", "NoPopReachable", "client_tls_context", "should_move"]

log = logging.getLogger("egressd.client")

PROBE_INTERVAL: Final = 0.5
DEAD_AFTER: Final = 1.5  # with the interval: a dead PoP is left within ~2 s (issue 7: 3 s)
REMEASURE: Final = 30.0
SAMPLES: Final = 3
SWITCH_FACTOR: Final = 0.7  # move only to a PoP at least 30 % faster ...
SWITCH_MARGIN_MS: Final = 2.0  # ... and 2 ms faster


class NoPopReachable(Exception):
    """No PoP answered: the message lists each PoP and why."""


@dataclass(frozen=True, slots=True)
class FlowOpened:
    stream: MuxStream
    connected_pop: str
    egress_pop: str
    local: str


def should_move(current_ms: float, other_ms: float) -> bool:
    """Hysteresis: move only to a PoP clearly faster than the connected one, so two PoPs
    at about the same RTT do not trade the device back and forth."""
    return other_ms < current_ms * SWITCH_FACTOR and current_ms - other_ms >= SWITCH_MARGIN_MS


def client_tls_context(ca: str | None) -> ssl.SSLContext:
    """TLS 1.3 + ALPN h2, the PoP verified (name included) against `ca` or the system's CAs."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    return context


class Attachment:
    def __init__(self, enrollment: Enrollment, context: ssl.SSLContext, *,
                 probe_interval: float = PROBE_INTERVAL, dead_after: float = DEAD_AFTER,
                 remeasure: float = REMEASURE,
                 on_change: Callable[[], None] | None = None) -> None:
        self.enrollment = enrollment
        self.pops = {pop.code: pop for pop in enrollment.pops}
        self._context = context
        self.probe_interval = probe_interval
        self.dead_after = dead_after
        self.remeasure = remeasure
        self.on_change = on_change
        self._authorization = basic_authorization(enrollment.device_id, enrollment.secret)
        self.clients: dict[str, MuxClient] = {}
        self.rtt_ms: dict[str, float | None] = {}
        self.errors: dict[str, str] = {}
        self.connected: str | None = None
        self.connected_since = 0.0
        self.switches: list[dict[str, Any]] = []
        self.last_flow: dict[str, str] = {}
        self.flows_opened = 0
        self._retired: list[MuxClient] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._switching = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def _client(self, pop: PopEndpoint) -> MuxClient:
        client = self.clients.get(pop.code)
        if client is None:
            client = self.clients[pop.code] = MuxClient(
                pop.host, pop.port, self._context, server_hostname=pop.host,
                connect_timeout=self.dead_after)
        return client

    async def _rtt(self, pop: PopEndpoint) -> float | None:
        """Best of a few PINGs in ms (the connection is made first, untimed), or None."""
        client = self._client(pop)
        best: float | None = None
        for _ in range(SAMPLES):
            try:
                rtt = 1000 * await client.ping(timeout=self.dead_after)
            except (MuxError, OSError) as error:
                self.errors[pop.code] = str(error)
                await self._drop(pop.code)
                return None
            best = rtt if best is None else min(best, rtt)
        self.errors.pop(pop.code, None)
        return best

    async def measure(self) -> dict[str, float | None]:
        codes = list(self.pops)
        results = await asyncio.gather(*(self._rtt(self.pops[code]) for code in codes))
        self.rtt_ms = {code: None if rtt is None else round(rtt, 3)
                       for code, rtt in zip(codes, results, strict=True)}
        return self.rtt_ms

    def fastest(self, exclude: frozenset[str] = frozenset()) -> str | None:
        reachable = [(rtt, code) for code, rtt in self.rtt_ms.items()
                     if rtt is not None and code not in exclude]
        return min(reachable)[1] if reachable else None

    async def start(self) -> str:
        """Measure, attach to the fastest PoP, and keep watching it. NoPopReachable if none."""
        await self.measure()
        best = self.fastest()
        if best is None:
            raise NoPopReachable("no PoP answered: " + "; ".join(
                f"{code} ({self.pops[code].address}): {self.errors.get(code, 'no answer')}"
                for code in self.pops))
        self._attach(best, "fastest at start")
        self._task = asyncio.create_task(self._watch(), name="client-attachment")
        return best

    def _attach(self, code: str, reason: str) -> None:
        previous, self.connected = self.connected, code
        self.connected_since = time.time()
        self.switches.append({"at": self.connected_since, "from": previous, "to": code,
                              "reason": reason})
        del self.switches[:-20]
        if previous is None:
            log.info("attached to %s (%s), RTT %s ms: %s", code, self.pops[code].address,
                     self.rtt_ms.get(code), reason)
        else:
            log.warning("moved from %s to %s: %s", previous, code, reason)
        if self.on_change is not None:
            self.on_change()

    async def _drop(self, code: str) -> None:
        """Forget a PoP's link; its streams fail now. Closing waits for the peer's TLS
        goodbye, which a frozen PoP never sends, so it goes on beside the failover."""
        client = self.clients.pop(code, None)
        if client is not None:
            task = asyncio.create_task(client.close(), name=f"client-drop-{code}")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _failover(self, dead: str, reason: str, why: str = "") -> None:
        """Leave `dead` for the fastest other PoP; `why` says so in the switch log."""
        async with self._switching:
            if self.connected != dead:
                return  # someone else moved already
            self.rtt_ms[dead] = None
            self.errors[dead] = reason
            await self._drop(dead)
            others = [self.pops[code] for code in self.pops if code != dead]
            results = await asyncio.gather(*(self._rtt(pop) for pop in others))
            for pop, rtt in zip(others, results, strict=True):
                self.rtt_ms[pop.code] = None if rtt is None else round(rtt, 3)
            best = self.fastest(exclude=frozenset({dead}))
            if best is None:
                log.error("PoP %s is dead (%s) and no other PoP answers; retrying", dead, reason)
                return
            self._attach(best, why or f"{dead} is unreachable ({reason})")

    async def _watch(self) -> None:
        next_measure = time.monotonic() + self.remeasure
        while True:
            started = time.monotonic()
            code = self.connected
            try:
                if code is None or self.rtt_ms.get(code) is None:
                    await self._recover()
                else:
                    await self._probe(code)
                if time.monotonic() >= next_measure:
                    next_measure = time.monotonic() + self.remeasure
                    await self._remeasure()
                await self._retire_idle()
            except Exception:  # a bug here must not stop the watching
                log.exception("client attachment probe failed")
            await asyncio.sleep(max(0.0, self.probe_interval - (time.monotonic() - started)))

    async def _probe(self, code: str) -> None:
        try:
            rtt = 1000 * await self._client(self.pops[code]).ping(timeout=self.dead_after)
        except (MuxError, OSError) as error:
            await self._failover(code, str(error) or "no answer")
            return
        previous = self.rtt_ms.get(code)
        self.rtt_ms[code] = round(rtt if previous is None else 0.3 * rtt + 0.7 * previous, 3)

    async def _recover(self) -> None:
        """Attached to nothing usable (every PoP failed): measure again, take the fastest."""
        await self.measure()
        best = self.fastest()
        if best is not None and best != self.connected:
            self._attach(best, "reachable again")

    async def _remeasure(self) -> None:
        current = self.connected
        if current is None:
            return
        others = [self.pops[code] for code in self.pops if code != current]
        results = await asyncio.gather(*(self._rtt(pop) for pop in others))
        for pop, rtt in zip(others, results, strict=True):
            self.rtt_ms[pop.code] = None if rtt is None else round(rtt, 3)
        mine = self.rtt_ms.get(current)
        best = self.fastest(exclude=frozenset({current}))
        if mine is None or best is None:
            return
        theirs = self.rtt_ms[best]
        assert theirs is not None
        if should_move(mine, theirs):
            async with self._switching:
                old = self.clients.pop(current, None)
                if old is not None:
                    self._retired.append(old)  # its flows go on; closed once idle
                self._attach(best, f"faster: {theirs:.1f} ms against {mine:.1f} ms")

    async def _retire_idle(self) -> None:
        for client in list(self._retired):
            if client.open_streams == 0:
                self._retired.remove(client)
                await client.close()

    async def open_tcp(self, host: str, port: int) -> FlowOpened:
        """One flow to host:port over the connected PoP's link. A link that fails here
        moves the client at once and the flow is tried once more on the next PoP.
        Raises StreamRefused (the PoP's status and reason) or MuxError/NoPopReachable."""
        return await self._open(PROTOCOL_TCP, host, port)

    async def open_udp(self, host: str, port: int) -> FlowOpened:
        """A CONNECT-UDP stream to host:port (RFC 9298); as `open_tcp` otherwise."""
        return await self._open(PROTOCOL_UDP, host, port)

    async def _open(self, protocol: str, host: str, port: int) -> FlowOpened:
        headers = {":path": target_path(protocol, host, port),
                   "proxy-authorization": self._authorization}
        for attempt in (1, 2):
            code = self.connected
            if code is None:
                raise NoPopReachable("not attached to any PoP (none answers)")
            try:
                stream = await self._client(self.pops[code]).open(headers, protocol=protocol)
            except StreamRefused as refused:
                if refused.status != 503 or attempt == 2:
                    raise
                await self._failover(code, refused.reason, f"{code} is draining")  # maintenance
                continue
            except MuxError as error:
                if attempt == 2:
                    raise
                await self._failover(code, str(error))
                continue
            self.flows_opened += 1
            opened = FlowOpened(stream, stream.response_headers.get("egressd-connected-pop", code),
                                stream.response_headers.get("egressd-egress-pop", "?"),
                                stream.response_headers.get("egressd-local", ""))
            self.last_flow = {"destination": f"{host}:{port}", "connected_pop": opened.connected_pop,
                              "egress_pop": opened.egress_pop, "source": opened.local}
            return opened
        raise AssertionError("unreachable")  # pragma: no cover

    def status(self) -> dict[str, Any]:
        return {"connected_pop": self.connected,
                "connected_since": self.connected_since,
                "rtt_ms": dict(self.rtt_ms),
                "errors": dict(self.errors),
                "pops": {code: {"city": pop.city, "address": pop.address}
                         for code, pop in self.pops.items()},
                "flows_opened": self.flows_opened,
                "last_flow": dict(self.last_flow),
                "switches": list(self.switches)}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for client in [*self.clients.values(), *self._retired]:
            await client.close()
        self.clients.clear()
        self._retired.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
