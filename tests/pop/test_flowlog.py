"""The flow log's writer: one JSON line per flow, on disk when `write` returns."""

from __future__ import annotations

import asyncio
import io
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.decide import Decision, Egress, Path
from egressd.model.addresses import parse_address
from egressd.pop import flowlog as flowlog_module
from egressd.pop.flowlog import FlowLog, FlowRecord
from egressd.pop.http_answers import start_record
from egressd.pop.identity import Identity


def record(n: int) -> FlowRecord:
    return FlowRecord(flow_id=f"t-{n}", protocol="tcp", connected_pop="las", client=f"127.0.0.1:{n}")


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_line_is_written_when_write_returns_even_inside_a_loop() -> None:
    """Callers send a flow's answer after logging it (the DNS service does): whoever saw the
    answer must find the line."""
    stream = io.StringIO()
    log = FlowLog(stream)
    for n in range(3):
        log.write(record(n))
        assert [line["flow_id"] for line in lines(stream)] == [f"t-{m}" for m in range(n + 1)]
    await asyncio.sleep(0)
    assert log.written == 3


async def test_a_failing_stream_loses_the_line_with_an_error_not_the_flow(
        caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    stream.close()
    log = FlowLog(stream)
    log.write(record(1))  # nothing raised into the flow's code
    assert "a line is lost" in caplog.text
    assert log.written == 0


def test_off_encodes_nothing() -> None:
    log = FlowLog.disabled()
    log.write(record(1))
    assert log.written == 0


def test_a_sink_gets_the_line_with_the_log_off() -> None:
    seen: list[str] = []
    log = FlowLog.disabled()
    log.sinks.append(seen.append)
    log.write(record(7))
    assert [json.loads(line)["flow_id"] for line in seen] == ["t-7"]


def test_the_cli_s_off_is_the_disabled_log_not_a_log_to_dev_null() -> None:
    """`egressd pop --flow-log off` once encoded every record and wrote it to /dev/null."""
    from egressd.cli.pop_cmd import _open_flow_log

    log = _open_flow_log("off")
    assert not log.enabled
    log.write(record(1))
    assert log.written == 0


def test_settle_heap_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    import gc

    from egressd.cli.runner import GC_YOUNG_THRESHOLD, settle_heap

    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_start_record_puts_each_value_in_its_field() -> None:
    """`start_record` passes its values by position (cheaper than keywords): each must land
    in the field of its name."""
    before_wall, before = time.time(), time.monotonic()
    made = start_record(cast(Any, SimpleNamespace(code="las")), ("192.0.2.7", 4242),
                        Identity(account="acme", user="ann", device="ann-laptop"))
    assert (made.protocol, made.connected_pop, made.client) == ("tcp", "las", "192.0.2.7:4242")
    assert (made.account, made.user, made.device) == ("acme", "ann", "ann-laptop")
    assert made.flow_id.startswith("las-") and made.outcome == "ok" and made.decision is None
    assert before_wall <= made.started <= time.time() and before <= made.started_monotonic <= time.monotonic()


# --- the line, written without the dictionary --------------------------------------------

_texts = st.none() | st.text(max_size=12)  # quotes, backslashes, controls, any plane


def reference_fields(flow: FlowRecord) -> dict[str, Any]:
    """What a flow log line holds, field by field, in order (DESIGN §4): the plain
    definition `as_line` is held to."""
    decision = flow.decision
    return {
        "time": datetime.fromtimestamp(flow.started, UTC).isoformat(timespec="milliseconds"),
        "flow_id": flow.flow_id,
        "account": flow.account,
        "user": flow.user,
        "device": flow.device,
        "protocol": flow.protocol,
        "client": flow.client,
        "destination": flow.destination,
        "hostname": flow.hostname,
        "port": flow.port,
        "connected_pop": flow.connected_pop,
        "egress_pop": decision.egress_pop if decision else None,
        "egress": decision.egress.value if decision else None,
        "source": flow.local_address or (str(decision.source_address) if decision and decision.source_address else None),
        "logical_location": decision.logical_city if decision else None,
        "proxy_v2_source": str(decision.proxy_v2_source) if decision and decision.proxy_v2_source else None,
        "rule": decision.rule if decision else None,
        "path": decision.path.value if decision and decision.path else None,
        "route": decision.route if decision else None,
        "bytes_up": flow.bytes_up,
        "bytes_down": flow.bytes_down,
        "duration_ms": round((time.monotonic() - flow.started_monotonic) * 1000, 1),
        "outcome": flow.outcome,
        "closed_by": flow.closed_by,
        "error": flow.error,
    }


@st.composite
def _records(draw: st.DrawFn) -> FlowRecord:
    flow = FlowRecord(flow_id=draw(st.text(min_size=1, max_size=10)),
                      protocol=draw(st.sampled_from(["tcp", "udp", "dns"])),
                      connected_pop=draw(st.text(max_size=5)), client=draw(st.text(max_size=24)),
                      started=draw(st.floats(min_value=0, max_value=4e9) | st.sampled_from(
                          [1795940023.9995, 1795940023.9999995, 1795940023.0004999, 1795940024.0])),
                      started_monotonic=100.0)
    flow.account, flow.user, flow.device = draw(_texts), draw(_texts), draw(_texts)
    flow.destination, flow.hostname, flow.local_address = draw(_texts), draw(_texts), draw(_texts)
    flow.port = draw(st.none() | st.integers(0, 65535))
    flow.bytes_up, flow.bytes_down = draw(st.integers(0, 2**63)), draw(st.integers(0, 2**63))
    flow.outcome, flow.closed_by, flow.error = draw(st.text(max_size=10)), draw(_texts), draw(_texts)
    if draw(st.booleans()):
        addresses = st.none() | st.sampled_from([parse_address("127.0.0.2"), parse_address("2001:db8::1")])
        flow.decision = Decision(
            egress=draw(st.sampled_from(list(Egress))), rule=draw(st.text(max_size=8)),
            connected_pop="las", source_address=draw(addresses), egress_pop=draw(_texts),
            path=draw(st.none() | st.sampled_from(list(Path))), logical_city=draw(_texts),
            proxy_v2_source=draw(addresses), route=draw(_texts))
    return flow


@settings(max_examples=400, deadline=None)
@given(flow=_records(), elapsed=st.floats(min_value=0, max_value=1e7))
def test_the_line_is_the_dictionarys_encoding_byte_for_byte(flow: FlowRecord, elapsed: float) -> None:
    """`as_line` writes what `json` writes for the reference fields: the same text."""
    now = flow.started_monotonic + elapsed
    with patch.object(flowlog_module.time, "monotonic", return_value=now):
        assert flow.as_line() == json.dumps(reference_fields(flow), separators=(",", ":"))


def test_sinks_get_the_very_line_the_log_writes() -> None:
    stream, seen = io.StringIO(), []
    log = FlowLog(stream)
    log.write(record(1))
    log.sinks.append(seen.append)
    log.write(record(2))
    assert [line["flow_id"] for line in lines(stream)] == ["t-1", "t-2"]
    assert seen == [stream.getvalue().splitlines()[1]]
    assert log.written == 2
