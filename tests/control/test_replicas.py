"""Two real `egressd control serve` replicas on one PostgreSQL database (issue 4).

(a) 50 concurrent assignments of one dedicated address, split across both replicas:
    exactly one wins (201), every other request gets a 409 problem naming `ipv4` and R2,
    never a 500, and the database holds one location for the address.
(b) The replicas share state: a change through r1 is read through r2, and a PoP
    long-polling r2 receives the new version within 2 s of a change made through r1.
And on either store: a race lost at a unique constraint is the same 409 a check gives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from egressd.control.db import make_engine
from egressd.control.problems import Problem
from egressd.control.tables import LocationRow

from .conftest import Api, postgres_database

ADDRESS = "203.0.113.20"  # the one dedicated address every racer wants
START_TIMEOUT = 45.0  # two interpreters importing FastAPI + migrating, on 2 shared cores


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class Cluster:
    r1: Replica
    r2: Replica
    database: str
    admin: str

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait(timeout=10)


def _wait_healthy(replica: Replica, deadline: float) -> None:
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            pytest.fail(f"replica {replica.name} exited ({replica.process.returncode}):\n"
                        f"{replica.output()}")
        try:
            response = httpx.get(f"{replica.url}/health", timeout=1.0)
            if response.status_code == 200 and response.json()["replica"] == replica.name:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"replica {replica.name} did not answer /health within {START_TIMEOUT} s:\n"
                f"{replica.output()}")


@pytest.fixture
def pg_database() -> Iterator[str]:
    yield from postgres_database()


@pytest.fixture
def cluster(pg_database: str, tmp_path: Path) -> Iterator[Cluster]:
    """r1 and r2 started at the same moment on one fresh database; always stopped."""
    replicas: list[Replica] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EGRESSD_DATABASE_URL", None)
    try:
        for name in ("r1", "r2"):
            port = free_port()
            log = tmp_path / f"{name}.log"
            with log.open("wb") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "egressd", "control", "serve", "--db", pg_database,
                     "--listen", f"127.0.0.1:{port}", "--replica", name,
                     "--state-dir", str(tmp_path / name), "--log-level", "warning"],
                    stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )
            replicas.append(Replica(name, port, process, log))
        deadline = time.monotonic() + START_TIMEOUT
        for replica in replicas:
            _wait_healthy(replica, deadline)
        # Exactly one of them found the store without an admin token and wrote one.
        tokens = [path for path in (tmp_path / "r1" / "admin.token", tmp_path / "r2" / "admin.token")
                  if path.exists()]
        assert len(tokens) == 1, tokens
        yield Cluster(replicas[0], replicas[1], pg_database, tokens[0].read_text().strip())
    finally:
        for replica in replicas:
            _stop(replica)
    for replica in replicas:
        assert replica.process.returncode is not None
        assert port_is_free(replica.port), f"port {replica.port} of {replica.name} still bound"


def seed(cluster: Cluster) -> None:
    """Two cities, one dedicated address at lax, two enterprise accounts — half through
    each replica."""
    with httpx.Client(headers=cluster.headers(), timeout=30) as client:
        for url, body in (
            (cluster.r1.url, {"code": "lax", "city": "Los Angeles", "country": "US",
                              "region": "US-CA", "latitude": 34.05, "longitude": -118.24,
                              "shared_ipv4": ["198.51.100.20"]}),
            (cluster.r2.url, {"code": "jfk", "city": "New York", "country": "US",
                              "region": "US-NY", "latitude": 40.71, "longitude": -74.01,
                              "shared_ipv4": ["198.51.100.30"]}),
        ):
            response = client.post(f"{url}/v1/data-centers", json=body)
            assert response.status_code == 201, response.text
        response = client.post(f"{cluster.r1.url}/v1/addresses", json={
            "address": ADDRESS, "data_center": "lax", "kind": "dedicated"})
        assert response.status_code == 201, response.text
        for url, account in ((cluster.r1.url, "acme"), (cluster.r2.url, "initech")):
            response = client.post(f"{url}/v1/accounts", json={
                "id": account, "name": account.title(), "plan": "enterprise"})
            assert response.status_code == 201, response.text


async def _race(cluster: Cluster, requests: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(headers=cluster.headers(), timeout=60, limits=limits) as client:
        # Open the connections first so the requests leave together, not behind handshakes.
        await asyncio.gather(*(client.get(f"{replica.url}/health")
                               for replica in (cluster.r1, cluster.r2) for _ in range(requests // 2)))
        start = asyncio.Event()

        async def assign(index: int) -> httpx.Response:
            replica = (cluster.r1, cluster.r2)[index % 2]
            account = ("acme", "initech")[(index // 2) % 2]  # each account through both
            await start.wait()
            return await client.post(f"{replica.url}/v1/accounts/{account}/locations",
                                      json={"ipv4": ADDRESS, "confirmed": True})

        tasks = [asyncio.create_task(assign(index)) for index in range(requests)]
        await asyncio.sleep(0.05)
        start.set()
        return await asyncio.gather(*tasks)


@pytest.mark.postgres
@pytest.mark.slow
def test_concurrent_assignment_of_one_address(cluster: Cluster) -> None:
    seed(cluster)
    responses = asyncio.run(_race(cluster, 50))
    statuses = sorted(response.status_code for response in responses)
    assert 500 not in statuses, [r.text for r in responses if r.status_code >= 500]
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == 49, statuses
    kinds = Counter((r.json().get("field"), r.json().get("rule"), r.json()["detail"])
                    for r in responses if r.status_code == 409)
    print("\n409s:", dict(kinds))  # the winner's account gets "to this account"
    winner = next(r for r in responses if r.status_code == 201).json()
    assert winner["ipv4"] == ADDRESS and winner["pop"] == "lax"
    for response in responses:
        if response.status_code != 409:
            continue
        assert response.headers["content-type"].startswith("application/problem+json")
        problem: dict[str, Any] = response.json()
        assert problem["status"] == 409 and problem["title"] and problem["type"], problem
        assert problem.get("field") == "ipv4" and problem.get("rule") == "R2", problem
        assert ADDRESS in problem["detail"] and "assigned" in problem["detail"], problem
    engine = make_engine(cluster.database)
    try:
        with engine.connect() as connection:
            holders = connection.execute(
                select(LocationRow.account_id, func.count())
                .where(LocationRow.ipv4 == ADDRESS).group_by(LocationRow.account_id)).all()
            total = connection.scalar(select(func.count()).select_from(LocationRow))
    finally:
        engine.dispose()
    assert holders == [(winner["account_id"], 1)] and total == 1
    # Both replicas say the same: the inventory shows the one holder.
    for replica in (cluster.r1, cluster.r2):
        listed = httpx.get(f"{replica.url}/v1/addresses", params={"kind": "dedicated"},
                           headers=cluster.headers(), timeout=10).json()
        assert listed == [{"address": ADDRESS, "family": 4, "kind": "dedicated",
                           "data_center": "lax", "assigned_to": winner["account_id"]}]


def _long_poll(url: str, token: str, after: int, pop: str, out: dict[str, Any]) -> None:
    try:
        response = httpx.get(f"{url}/v1/snapshot", params={"after": after, "pop": pop, "wait": 10},
                             headers={"Authorization": f"Bearer {token}"}, timeout=20)
        out["response"] = response
    except Exception as error:  # reported by the test thread
        out["error"] = error
    out["returned_at"] = time.monotonic()


@pytest.mark.postgres
@pytest.mark.slow
def test_replicas_share_state_and_snapshots(cluster: Cluster) -> None:
    seed(cluster)
    r1, r2 = cluster.r1, cluster.r2
    with httpx.Client(headers=cluster.headers(), timeout=30) as client:
        # A change through r1 is what r2 reads, at once (no cache between them).
        response = client.patch(f"{r1.url}/v1/accounts/acme", json={"name": "Acme Corp"})
        assert response.status_code == 200, response.text
        assert client.get(f"{r2.url}/v1/accounts/acme").json()["name"] == "Acme Corp"
        response = client.post(f"{r2.url}/v1/accounts/acme/locations",
                               json={"ipv4": ADDRESS, "confirmed": True})
        assert response.status_code == 201, response.text
        assert [loc["ipv4"] for loc in client.get(f"{r1.url}/v1/accounts/acme/locations").json()] \
            == [ADDRESS]

        pop_token = client.post(f"{r1.url}/v1/tokens",
                                json={"name": "pop-lax", "scope": "pop"}).json()["token"]
        latencies: list[float] = []
        for round_number in range(3):
            version = client.get(f"{r2.url}/v1/version").json()["version"]
            pop = f"lax{round_number}"
            out: dict[str, Any] = {}
            poller = threading.Thread(target=_long_poll, args=(r2.url, pop_token, version, pop, out),
                                      daemon=True)
            poller.start()
            # The poll is parked once r2 has recorded the PoP's confirmation of `version`.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pops = {p["pop"]: p for p in client.get(f"{r1.url}/v1/version").json()["pops"]}
                if pop in pops:
                    assert pops[pop]["version"] == version and pops[pop]["replica"] == "r2"
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the long poll never reached r2")
            assert poller.is_alive(), out  # nothing newer yet: it waits
            sent = time.monotonic()
            response = client.patch(f"{r1.url}/v1/accounts/acme/settings/network",
                                    json={"proxy_udp": round_number % 2 == 0})
            committed = time.monotonic()
            assert response.status_code == 200, response.text
            poller.join(timeout=15)
            assert not poller.is_alive() and "error" not in out, out
            snapshot = out["response"]
            assert snapshot.status_code == 200, (snapshot.status_code, snapshot.text)
            body = snapshot.json()
            assert body["version"] == version + 1 == int(snapshot.headers["X-Egressd-Version"])
            acme = next(a for a in body["deployment"]["accounts"] if a["id"] == "acme")
            assert acme["network"]["proxy_udp"] is (round_number % 2 == 0)
            assert acme["name"] == "Acme Corp" and acme["locations"][0]["ipv4"] == ADDRESS
            latency = out["returned_at"] - committed
            latencies.append(latency)
            print(f"\nsnapshot on r2 after a change through r1: {latency * 1000:.0f} ms after "
                  f"the commit ({(out['returned_at'] - sent) * 1000:.0f} ms after the request)")
            assert latency <= 2.0, latency
        print(f"r1 -> r2 propagation, {len(latencies)} rounds: median "
              f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
        # r2's next poll carries the new version: /v1/version shows it confirmed, on r1 too.
        version = client.get(f"{r1.url}/v1/version").json()["version"]
        response = httpx.get(f"{r2.url}/v1/snapshot", params={"after": version, "pop": "lax0"},
                             headers={"Authorization": f"Bearer {pop_token}"}, timeout=10)
        assert response.status_code == 204
        status = {p["pop"]: p for p in client.get(f"{r1.url}/v1/version").json()["pops"]}["lax0"]
        assert status["version"] == version and status["current"] is True


def test_a_race_lost_at_the_constraint_is_the_same_409(world: Api) -> None:
    """Past the service's own checks (as two racing writers can get), the database's unique
    constraints decide; the loser's problem names the field and rule like the check does."""
    ctx = world.app.state.ctx
    response = world.post("/v1/accounts/acme/locations", {"ipv4": ADDRESS})
    assert response.status_code == 201, response.text
    for account, location_id, field, rule in (("globex", "lax", "ipv4", "R2"),
                                              ("acme", "lax", "id", None)):
        with pytest.raises(Problem) as caught, ctx.change() as session:
            session.add(LocationRow(account_id=account, id=location_id,
                                    ipv4=ADDRESS if field == "ipv4" else "203.0.113.21",
                                    state="pending", assigned_at=datetime.now(UTC)))
            session.flush()
        problem = caught.value
        assert (problem.status, problem.field, problem.rule) == (409, field, rule), problem.detail
        assert "concurrent" in problem.detail
        if field == "ipv4" and "postgres" in str(ctx.sessions.kw["bind"].url):
            assert ADDRESS in problem.detail
