"""The per-flow Prometheus figures of a PoP process, handed to prometheus-client in
batches.

Why: every `inc()` of a prometheus-client child is four Python calls and a lock (with
several workers also a `getpid` and a write to its file), and a tunnel made eight of them
(active up and down, the flow, bytes up and down, the connect histogram's bucket and sum).
Here a flow adds to plain numbers, and the sums go to the children `FLUSH_DELAY` after
the first change that is not handed over yet. Handing them over at the end of every
loop turn, as before, cost a tunnel at concurrency 1 some 15 µs of its ~190 (one turn
per event, so no batching). A scrape served by this process calls `flush()` first and
sees everything; with several workers, another worker's figures are at most
`FLUSH_DELAY` old, far below any scrape interval. Outside a running loop (tests,
shutdown) every change goes through at once. `flush()` also runs when the PoP closes.

The connect histogram's observations are counted per bucket here and added to the
child's bucket and sum values (prometheus-client's `_buckets`, `_sum`, `_upper_bounds`:
what `observe` itself updates); a client without them gets one `observe` per sample.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

from egressd.pop.metrics import PopMetrics

#: (protocol, egress kind, rule, outcome) -> flows ended
FlowKey = tuple[str, str, str, str]

_MAX_CACHED_CHILDREN: Final = 4096
#: Seconds from the first change not handed over to prometheus-client until it is.
FLUSH_DELAY: Final = 0.5


class FlowMetrics:
    __slots__ = ("_active", "_bytes_down", "_bytes_up", "_children", "_code",
                 "_connects", "_down_child", "_ended", "_flush_delay", "_histograms", "_metrics",
                 "_tcp_child", "_timer", "_up_child")

    def __init__(self, metrics: PopMetrics, code: str, *, flush_delay: float = FLUSH_DELAY) -> None:
        self._metrics = metrics
        self._flush_delay = flush_delay
        self._code = code
        self._ended: dict[FlowKey, int] = {}
        self._bytes_up = 0
        self._bytes_down = 0
        self._active = 0  # change of the active TCP flows since the last flush
        self._timer: asyncio.TimerHandle | None = None  # the pending hand-over
        # Children per label tuple: `labels()` costs microseconds per call.
        self._children: dict[FlowKey, Counter] = {}
        self._up_child = metrics.bytes.labels(code, "up")
        self._down_child = metrics.bytes.labels(code, "down")
        self._tcp_child: Gauge = metrics.active.labels(code, "tcp")
        # path -> [sum, count per bucket...] of the connect times not handed over yet
        self._connects: dict[str, list[float]] = {}
        # Per path: the histogram's child, and its bucket bounds if this prometheus-client
        # has the internals `flush` adds to (looked up once, not per connect).
        self._histograms: dict[str, tuple[Histogram, list[float] | None]] = {}

    def connect_observed(self, path: str, seconds: float) -> None:
        """An upstream connect took `seconds` (the connect histogram, by path)."""
        known = self._histograms.get(path)
        if known is None:
            child = self._metrics.connect_seconds.labels(self._code, path)
            bounds: list[float] | None = getattr(child, "_upper_bounds", None)
            if not (hasattr(child, "_buckets") and hasattr(child, "_sum")):
                bounds = None
            known = self._histograms[path] = (child, bounds)
        bounds = known[1]
        if bounds is None:
            known[0].observe(seconds)  # a prometheus-client without them: one by one
            return
        counts = self._connects.get(path)
        if counts is None:
            counts = self._connects[path] = [0.0] * (len(bounds) + 1)
        counts[0] += seconds
        counts[1 + bisect_left(bounds, seconds)] += 1  # the first bucket with bound >= it
        if self._timer is None:
            self._arm()

    def flow_ended(self, key: FlowKey, bytes_up: int, bytes_down: int) -> None:
        ended = self._ended
        ended[key] = ended.get(key, 0) + 1
        self._bytes_up += bytes_up
        self._bytes_down += bytes_down
        if self._timer is None:
            self._arm()

    def tcp_opened(self) -> None:
        self._active += 1
        if self._timer is None:
            self._arm()

    def tcp_closed(self) -> None:
        self._active -= 1
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = loop.call_later(self._flush_delay, self.flush)

    def flush(self) -> None:
        """Hand what changed to prometheus-client (a scrape's process first calls this)."""
        if self._timer is not None:
            self._timer.cancel()  # a no-op when it is the timer that runs this
            self._timer = None
        if self._ended:
            children = self._children
            for key, count in self._ended.items():
                child = children.get(key)
                if child is None:
                    if len(children) >= _MAX_CACHED_CHILDREN:
                        children.clear()
                    child = children[key] = self._metrics.flows.labels(self._code, *key)
                child.inc(count)
            self._ended.clear()
        if self._bytes_up:
            self._up_child.inc(self._bytes_up)
            self._bytes_up = 0
        if self._bytes_down:
            self._down_child.inc(self._bytes_down)
            self._bytes_down = 0
        if self._active:
            self._tcp_child.inc(self._active)
            self._active = 0
        if self._connects:
            for path, counts in self._connects.items():
                histogram: Any = self._histograms[path][0]
                histogram._sum.inc(counts[0])
                buckets = histogram._buckets
                for index, observed in enumerate(counts[1:]):
                    if observed:
                        buckets[index].inc(observed)
            self._connects.clear()
