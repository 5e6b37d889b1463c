"""PoPs report their view of the backbone (reachable peers, RTTs); /v1/version shows it."""

from __future__ import annotations

from .conftest import Api


def test_a_pop_reports_its_peers_and_rtts(world: Api) -> None:
    pop = world.token("pop", name="pop-las")
    body = {"up": ["las", "lax"], "rtt_ms": {"lax": 5.5, "jfk": 54.2}}
    assert world.put("/v1/pops/las/health", body, token=pop).status_code == 204
    rows = {row["pop"]: row for row in world.get("/v1/version").json()["pops"]}
    view = rows["las"]["view"]
    assert (view["up"], view["rtt_ms"]) == (["las", "lax"], {"lax": 5.5, "jfk": 54.2})
    assert 0 <= view["seconds_since_reported"] < 60
    # The confirmation of a version (the long poll) keeps the view, and the other way round.
    assert world.get("/v1/snapshot", pop, params={"pop": "las", "after": 0}).status_code == 200
    rows = {row["pop"]: row for row in world.get("/v1/version").json()["pops"]}
    assert rows["las"]["view"]["rtt_ms"] == {"lax": 5.5, "jfk": 54.2}
    assert rows["las"]["version"] == 0


def test_only_pops_report_and_bad_views_are_refused(world: Api) -> None:
    account = world.token("account", "acme")
    body = {"up": ["las"], "rtt_ms": {}}
    assert world.put("/v1/pops/las/health", body, token=account).status_code == 403
    pop = world.token("pop", name="pop-las")
    for bad in ({"up": ["LAS!"], "rtt_ms": {}}, {"up": [], "rtt_ms": {"lax": -1}},
                {"up": [], "rtt_ms": {}, "extra": 1}):
        response = world.put("/v1/pops/las/health", bad, token=pop)
        assert response.status_code == 422, (bad, response.text)


def test_the_snapshot_is_sent_gzipped_to_pops_that_accept_it(world: Api) -> None:
    import json

    pop = world.token("pop", name="pop-las")
    plain = world.client.get("/v1/snapshot", headers={**world.headers(pop),
                                                      "Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    raw = world.client.get("/v1/snapshot", headers={**world.headers(pop),
                                                    "Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip" and raw.headers["vary"] == "Accept-Encoding"
    # httpx decodes it; the document is the same either way.
    assert json.loads(raw.content) == json.loads(plain.content)
    assert raw.num_bytes_downloaded < len(plain.content)  # compressed on the wire
