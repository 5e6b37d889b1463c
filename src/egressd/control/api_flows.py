"""Flows: PoPs push their flow-log records; the dashboard tails them (long poll)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from egressd.control.deps import Caller
from egressd.control.flowfeed import FlowFeed, Record

router = APIRouter(prefix="/v1", tags=["flows"])

MAX_BATCH = 2000


def feed_of(request: Request) -> FlowFeed:
    feed: FlowFeed = request.app.state.flows
    return feed


class FlowBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flows: list[dict[str, Any]] = Field(max_length=MAX_BATCH,
                                        description="Flow-log records (docs/operations.md)")


class FlowsAccepted(BaseModel):
    accepted: int


class FlowPage(BaseModel):
    next: int = Field(description="Pass as `after` to get newer flows")
    flows: list[dict[str, Any]]


@router.post("/flows", response_model=FlowsAccepted, status_code=202)
async def push_flows(body: FlowBatch, request: Request, caller: Caller) -> FlowsAccepted:
    """A PoP's batch of finished flows (PoP or deployment token)."""
    caller.require_pop()
    records = [record for record in body.flows if isinstance(record.get("connected_pop"), str)]
    return FlowsAccepted(accepted=await feed_of(request).add(records))


@router.get("/flows", response_model=FlowPage)
async def tail_flows(
    request: Request, caller: Caller,
    after: Annotated[int, Query(ge=0, description="The `next` of the previous page")] = 0,
    wait: Annotated[float, Query(ge=0, le=25, description="Seconds to wait for a newer flow")] = 0,
    account: Annotated[str | None, Query(max_length=64)] = None,
    pop: Annotated[str | None, Query(max_length=16)] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> FlowPage:
    """The newest flows after `after`, oldest first; waits up to `wait` s for one. An
    account token sees its own account's flows only."""
    if caller.scope != "deployment":
        caller.require_account(account or caller.account_id or "")
        account = caller.account_id
    wanted = {key: value for key, value in (("account", account), ("connected_pop", pop),
                                            ("rule", rule), ("outcome", outcome)) if value}

    def keep(record: Record) -> bool:
        return all(record.get(key) == value for key, value in wanted.items())

    feed = feed_of(request)
    if after > feed.last:
        after = 0  # a cursor from before this replica started: start over
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        mark = feed.last  # every record up to here is considered by this page
        flows = [flow for flow in feed.since(after, keep, limit) if flow["seq"] <= mark]
        remaining = deadline - asyncio.get_running_loop().time()
        if flows or remaining <= 0 or feed.closing or await request.is_disconnected():
            return FlowPage(next=mark, flows=flows)
        await feed.wait(mark, min(remaining, 1.0))  # a closed tab ends its poll within 1 s
        after = mark
