"""The flow log's writer: one JSON line per flow, the lines of one loop turn in one write."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from egressd.pop.flowlog import FlowLog, FlowRecord


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def close(self) -> None:  # kept readable for the assertions
        self.closed_by_log = True


def record(n: int) -> FlowRecord:
    return FlowRecord(flow_id=f"t-{n}", protocol="tcp", connected_pop="las", client=f"127.0.0.1:{n}")


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_without_a_running_loop_each_line_is_written_at_once() -> None:
    stream = CountingStream()
    log = FlowLog(stream)
    log.write(record(1))
    assert [line["flow_id"] for line in lines(stream)] == ["t-1"]
    assert stream.writes == 1


async def test_the_lines_of_one_loop_turn_go_out_in_one_write_within_that_turn() -> None:
    stream = CountingStream()
    log = FlowLog(stream)
    for n in range(3):
        log.write(record(n))
    assert stream.getvalue() == ""  # held until the end of the turn
    await asyncio.sleep(0)
    assert [line["flow_id"] for line in lines(stream)] == ["t-0", "t-1", "t-2"]
    assert stream.writes == 1
    assert log.written == 3


async def test_a_burst_is_written_in_bounded_batches_and_close_writes_the_rest() -> None:
    stream = CountingStream()
    log = FlowLog(stream)
    for n in range(600):
        log.write(record(n))
    assert len(lines(stream)) == 512  # two full batches of 256 went out within the turn
    log.close()
    assert [line["flow_id"] for line in lines(stream)] == [f"t-{n}" for n in range(600)]
    assert stream.closed_by_log


async def test_a_failing_stream_loses_the_lines_with_an_error_not_the_flow(
        caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    stream.close()
    log = FlowLog(stream)
    log.write(record(1))
    await asyncio.sleep(0)  # the flush fails: logged, nothing raised into the loop
    assert "1 lines lost" in caplog.text


def test_off_encodes_nothing() -> None:
    log = FlowLog.disabled()
    log.write(record(1))
    assert log.written == 0
