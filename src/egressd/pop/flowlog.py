"""The flow log: one JSON line per flow, failed ones included (DESIGN §4).

A FlowRecord is filled in as the flow progresses (identity, decision, upstream socket,
byte counts) and written once, when the flow ends, by `FlowLog.write`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO

from egressd.decide import Decision

log = logging.getLogger("egressd.flowlog")


@dataclass(slots=True)
class FlowRecord:
    flow_id: str
    protocol: str
    connected_pop: str
    client: str
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    account: str | None = None
    user: str | None = None
    device: str | None = None
    destination: str | None = None
    hostname: str | None = None
    port: int | None = None
    decision: Decision | None = None
    local_address: str | None = None  # the source address and port actually used upstream
    bytes_up: int = 0
    bytes_down: int = 0
    outcome: str = "ok"  # ok, refused, auth-failed, upstream-error, protocol-error
    closed_by: str | None = None
    error: str | None = None
    admitted: tuple[str, str] | None = None  # (account, source) holding a flow slot

    def as_line(self) -> str:
        """The flow's log line (DESIGN §4), written as `json.dumps(..., separators=(",",
        ":"))` would write its fields, byte for byte, but without a dictionary, a `datetime`
        or the encoder's walk: a forwarded request's line cost more than the request itself
        (benchmarks/README.md; tests/pop/test_flowlog.py holds it to `json`). Enum members
        go in as the strings they are; numbers as `json` writes them (`repr`)."""
        esc = _esc
        decision = self.decision
        if decision is not None:
            proxy_v2, path = decision.proxy_v2_source, decision.path
            egress_pop, source, city, rule, route = [  # one comprehension, not five calls
                "null" if text is None else esc(text) for text in (
                    decision.egress_pop,
                    self.local_address or (str(decision.source_address) if decision.source_address else None),
                    decision.logical_city, decision.rule, decision.route)]
            decided = (f'"egress_pop":{egress_pop},"egress":{esc(decision.egress)},"source":{source},'
                       f'"logical_location":{city},'
                       f'"proxy_v2_source":{esc(str(proxy_v2)) if proxy_v2 else "null"},'
                       f'"rule":{rule},"path":{esc(path) if path else "null"},"route":{route}')
        else:
            local = self.local_address
            decided = (f'"egress_pop":null,"egress":null,"source":{esc(local) if local else "null"},'
                       '"logical_location":null,"proxy_v2_source":null,"rule":null,"path":null,"route":null')
        account, user, device, destination, hostname, closed_by, error = [
            "null" if text is None else esc(text) for text in (
                self.account, self.user, self.device, self.destination, self.hostname,
                self.closed_by, self.error)]
        port = self.port
        return (f'{{"time":"{_iso_milliseconds(self.started)}","flow_id":{esc(self.flow_id)},'
                f'"account":{account},"user":{user},"device":{device},'
                f'"protocol":{esc(self.protocol)},"client":{esc(self.client)},'
                f'"destination":{destination},"hostname":{hostname},'
                f'"port":{"null" if port is None else port},'
                f'"connected_pop":{esc(self.connected_pop)},{decided},'
                f'"bytes_up":{self.bytes_up},"bytes_down":{self.bytes_down},'
                f'"duration_ms":{round((time.monotonic() - self.started_monotonic) * 1000, 1)},'
                f'"outcome":{esc(self.outcome)},"closed_by":{closed_by},"error":{error}}}')


#: A JSON string as `json.dumps` writes it (`ensure_ascii`): quoted, escaped (C).
_esc: Callable[[str], str] = json.encoder.encode_basestring_ascii


#: The last second `_iso_milliseconds` formatted: (whole seconds, date and time of day).
_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def _iso_milliseconds(started: float) -> str:
    """`datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds")`, with the
    date and the time of day formatted once per second. Microseconds are rounded half to
    even, as `fromtimestamp` does, then cut to milliseconds, as `isoformat` does."""
    global _second
    whole = math.floor(started)
    micro = round((started - whole) * 1e6)  # the fraction is exact; round() is half-even
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    if _second[0] != whole:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{micro // 1000:03d}+00:00"


class FlowLog:
    """Writes flow records as JSON lines to a file (or stderr), flushed per line.

    Per line, not batched per event-loop turn: a line is on disk before the flow's answer
    leaves (the DNS service logs a query, then sends its answer), so whoever saw the
    answer finds the line. Batching saved nothing measurable (benchmarks/README.md).
    """

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.written = 0
        # Also handed each line (the shipper to the control plane's live feed).
        self.sinks: list[Callable[[str], None]] = []

    @classmethod
    def disabled(cls) -> FlowLog:
        """`--flow-log off`: no encoding, no write."""
        return cls(enabled=False)

    @property
    def read(self) -> bool:
        """Whether records are read at all (a log, or a sink): fields only they need can
        be skipped otherwise."""
        return self.enabled or bool(self.sinks)

    def write(self, record: FlowRecord) -> None:
        sinks = self.sinks
        if not self.enabled and not sinks:
            return
        line = record.as_line()
        if self.enabled:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
                self.written += 1
            except (OSError, ValueError) as exc:  # a full disk, a closed stream: not the flow's problem
                log.error("flow log: a line is lost: %s", exc)
        for sink in sinks:
            sink(line)

    @classmethod
    def to_path(cls, path: str) -> FlowLog:
        """Append to `path`, created readable by its owner only: it says who went where."""
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return cls(os.fdopen(descriptor, "a", encoding="utf-8", buffering=1))

    def close(self) -> None:
        if self._stream not in (sys.stderr, sys.stdout):
            self._stream.close()
