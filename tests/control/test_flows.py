"""The live flow feed: PoPs push flow-log records, the dashboard tails them."""

from __future__ import annotations

import threading
import time
from typing import Any

from .conftest import Api


def record(account: str, pop: str = "las", rule: str = "R6", outcome: str = "ok") -> dict[str, Any]:
    return {"account": account, "connected_pop": pop, "rule": rule, "outcome": outcome,
            "destination": "203.0.113.9", "bytes_up": 1, "bytes_down": 2}


def test_pushed_flows_are_tailed_with_filters(world: Api) -> None:
    pop = world.token("pop", name="pop-las")
    response = world.post("/v1/flows", {"flows": [record("acme"), record("globex", "lax"),
                                                   record("acme", rule="R1", outcome="refused")]},
                          token=pop)
    assert response.status_code == 202 and response.json() == {"accepted": 3}
    page = world.get("/v1/flows").json()
    assert [flow["account"] for flow in page["flows"]] == ["acme", "globex", "acme"]
    assert page["next"] == page["flows"][-1]["seq"]
    only = world.get("/v1/flows", params={"account": "acme", "outcome": "refused"}).json()
    assert [(f["rule"], f["outcome"]) for f in only["flows"]] == [("R1", "refused")]
    assert world.get("/v1/flows", params={"pop": "lax"}).json()["flows"][0]["account"] == "globex"
    assert world.get("/v1/flows", params={"after": page["next"]}).json()["flows"] == []


def test_an_account_token_sees_only_its_own_flows(world: Api) -> None:
    pop = world.token("pop", name="pop-las")
    world.post("/v1/flows", {"flows": [record("acme"), record("globex")]}, token=pop)
    globex = world.token("account", "globex")
    flows = world.get("/v1/flows", globex).json()["flows"]
    assert [flow["account"] for flow in flows] == ["globex"]
    assert world.get("/v1/flows", globex, params={"account": "acme"}).status_code == 403
    # Only PoPs (and deployment admins) push.
    assert world.post("/v1/flows", {"flows": [record("globex")]}, token=globex).status_code == 403


def test_the_long_poll_wakes_on_a_new_flow(world: Api) -> None:
    pop = world.token("pop", name="pop-las")
    start = world.get("/v1/flows").json()["next"]

    def push_later() -> None:
        time.sleep(0.3)
        world.post("/v1/flows", {"flows": [record("acme")]}, token=pop)

    pusher = threading.Thread(target=push_later)
    pusher.start()
    began = time.monotonic()
    page = world.get("/v1/flows", params={"after": start, "wait": 10}).json()
    pusher.join()
    assert [flow["account"] for flow in page["flows"]] == ["acme"]
    assert time.monotonic() - began < 5
    # Nothing newer: the poll ends after `wait`, with the same cursor.
    empty = world.get("/v1/flows", params={"after": page["next"], "wait": 0.2}).json()
    assert empty == {"next": page["next"], "flows": []}
