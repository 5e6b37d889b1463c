"""`FlowShipper`: the flow log's lines reach the control plane's `POST /v1/flows` as one
JSON document per batch, in order, and a failed batch is sent again. A real HTTP server
on 127.0.0.1 reads what arrives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from egressd.pop.flow_shipper import FlowShipper
from egressd.pop.flowlog import FlowLog, FlowRecord


@asynccontextmanager
async def control_plane(statuses: list[int]) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """Answers each POST with the next of `statuses` (then 200); yields its URL and what
    arrived: the path, the content type and the parsed body of every request."""
    arrived: list[dict[str, Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head[1:] if ":" in line}
        body = await reader.readexactly(int(fields["content-length"]))
        arrived.append({"path": head[0].split()[1], "type": fields.get("content-type"),
                        "body": json.loads(body)})
        status = statuses.pop(0) if statuses else 200
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}", arrived
    finally:
        server.close()
        await server.wait_closed()


def flow(n: int, error: str | None = None) -> FlowRecord:
    record = FlowRecord(flow_id=f"t-{n}", protocol="tcp", connected_pop="las", client=f"127.0.0.1:{n}")
    record.error = error
    return record


async def test_lines_arrive_as_one_json_document_per_batch_in_order() -> None:
    async with control_plane([]) as (url, arrived):
        shipper = FlowShipper(url, "token", interval=0.05)
        log = FlowLog.disabled()
        log.sinks.append(shipper)
        shipper.start()
        for n, error in enumerate((None, 'a "quoted" \\ error', "naïve ☃ \U0001f600", None)):
            log.write(flow(n, error))
        for _ in range(100):
            if arrived:
                break
            await asyncio.sleep(0.02)
        await shipper.close()
    (batch,) = arrived
    assert batch["path"] == "/v1/flows" and batch["type"] == "application/json"
    flows = batch["body"]["flows"]
    assert [entry["flow_id"] for entry in flows] == ["t-0", "t-1", "t-2", "t-3"]
    assert [entry["error"] for entry in flows] == [None, 'a "quoted" \\ error', "naïve ☃ \U0001f600", None]
    assert shipper.sent == 4


async def test_a_batch_the_control_plane_refused_is_sent_again_in_order() -> None:
    async with control_plane([500]) as (url, arrived):
        shipper = FlowShipper(url, "token", interval=0.05)
        for n in range(3):
            shipper(flow(n).as_line())
        shipper.start()
        for _ in range(200):
            if len(arrived) >= 2:
                break
            await asyncio.sleep(0.02)
        await shipper.close()
    assert len(arrived) == 2
    assert [entry["flow_id"] for entry in arrived[0]["body"]["flows"]] == ["t-0", "t-1", "t-2"]
    assert [entry["flow_id"] for entry in arrived[1]["body"]["flows"]] == ["t-0", "t-1", "t-2"]
