"""Benchmark of the control plane's snapshot path on a large store.

10,000 accounts and 100,000 inventory addresses (bulk-inserted with SQLAlchemy Core, not
through the API), half the accounts enterprise with two dedicated locations in two cities,
a few users, devices and policies each. Measures:

  (a) build_s: `Publisher._build` — read every table and serialize the document (≤ 2 s);
  (b) propagation: a change through the API of a real `egressd control serve` process until
      50 concurrent watchers long-polling /v1/snapshot (asyncio + httpx) hold the new
      version, whole document received;
  (c) pop_load_s: a PoP's `json.loads` + `egressd.model.deployment.load_document` of it.

Prints one JSON line; a human summary goes to stderr.

    python benchmarks/control.py [--accounts N] [--addresses N] [--watchers N] [--rounds N]
    python benchmarks/control.py --db postgresql://USER:PASS@HOST/DB   # a scratch database
                                  # is created on that server and dropped afterwards
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, insert, text

from egressd.control.auth import create_token
from egressd.control.db import make_engine, migrate, normalise_url, sessions
from egressd.control.publisher import Publisher
from egressd.control.tables import (
    AccountRow,
    AddressRow,
    ConfigVersion,
    DataCenterRow,
    DeviceRow,
    GroupRow,
    LocationRow,
    MembershipRow,
    PolicyRow,
    UserRow,
)
from egressd.model.deployment import load_document
from egressd.model.errors import ValidationError

CHUNK = 5_000
START_TIMEOUT = 180.0  # the server builds the first document before it answers
ROUND_TIMEOUT = 60.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# The store
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_store(db: str | None) -> Iterator[str]:
    """SQLite in a temporary directory, or a scratch database on the given PostgreSQL server."""
    if db is None:
        with tempfile.TemporaryDirectory(prefix="egressd-bench-") as directory:
            yield f"sqlite:///{Path(directory) / 'control.db'}"
        return
    name = f"egressd_bench_{secrets.token_hex(4)}"
    admin = create_engine(normalise_url(db), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = normalise_url(db).rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _bulk(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as connection:
        for start in range(0, len(rows), CHUNK):
            connection.execute(insert(table), rows[start:start + CHUNK])


def _v6_range(n: int) -> str:
    return str(ipaddress.IPv6Network((int(ipaddress.IPv6Address("2001:db9::")) + (n << 80), 48)))


def populate(engine: Engine, args: argparse.Namespace, rng: random.Random) -> dict[str, int]:
    """Data centers, the address inventory, accounts with locations, users, devices and
    policies — valid by the same rules a PoP checks (R2: two cities per enterprise)."""
    now = datetime.now(UTC)
    dcs = [{"code": f"p{i:03d}", "city": f"City {i // 2}", "country": "US", "region": "",
            "latitude": rng.uniform(25, 48), "longitude": rng.uniform(-124, -67),
            "backbone": None, "slot": i + 1} for i in range(args.data_centers)]
    _bulk(engine, DataCenterRow, dcs)
    addresses: list[dict[str, Any]] = []
    base_v4 = int(ipaddress.IPv4Address("100.64.0.0"))
    for i, dc in enumerate(dcs):
        for k in range(2):
            addresses.append({"address": str(ipaddress.IPv4Address(base_v4 + i * 4 + k)),
                              "family": 4, "kind": "shared", "data_center": dc["code"]})
        addresses.append({"address": f"2001:db8:{i:x}::/48", "family": 6, "kind": "shared",
                          "data_center": dc["code"]})
    dedicated = args.addresses - len(addresses)
    v6_count = dedicated // 5  # a fifth of the dedicated inventory is IPv6 ranges
    v4_count = dedicated - v6_count
    first_dedicated = int(ipaddress.IPv4Address("100.100.0.0"))
    for n in range(v4_count):
        addresses.append({"address": str(ipaddress.IPv4Address(first_dedicated + n)),
                          "family": 4, "kind": "dedicated",
                          "data_center": dcs[n % len(dcs)]["code"]})
    for n in range(v6_count):  # range n is at the same PoP as IPv4 address n
        addresses.append({"address": _v6_range(n), "family": 6, "kind": "dedicated",
                          "data_center": dcs[n % len(dcs)]["code"]})
    _bulk(engine, AddressRow, addresses)

    accounts, locations, groups, users, members, devices, policies = [], [], [], [], [], [], []
    next_v4 = 0  # dedicated IPv4 n lives at dcs[n % len(dcs)]
    for a in range(args.accounts):
        account_id = f"acct{a:05d}"
        enterprise = a % 2 == 0
        accounts.append({"id": account_id, "name": f"Account {a}",
                         "plan": "enterprise" if enterprise else "free", "proxy_tcp": True,
                         "proxy_udp": a % 3 == 0, "fallback": "closed", "created_at": now})
        if enterprise:  # two locations in two different cities
            chosen: list[int] = []
            while len(chosen) < 2:
                dc_index = next_v4 % len(dcs)
                if not chosen or dc_index // 2 != chosen[0] % len(dcs) // 2:
                    chosen.append(next_v4)
                next_v4 += 1
            for index, n in enumerate(chosen):
                locations.append({"account_id": account_id, "id": f"loc{index}",
                                  "ipv4": str(ipaddress.IPv4Address(first_dedicated + n)),
                                  "ipv6": _v6_range(n) if n < v6_count else None,
                                  "state": "active", "assigned_at": now})
        groups.append({"account_id": account_id, "name": "staff"})
        for u in range(args.users):
            user = f"user{u}"
            users.append({"account_id": account_id, "name": user})
            members.append({"account_id": account_id, "user_name": user, "group_name": "staff"})
            devices.append({"id": f"{account_id}-{user}-laptop", "account_id": account_id,
                            "user_name": user, "created_at": now,
                            "secret_sha256": hashlib.sha256(f"{a}/{u}".encode()).hexdigest()})
        for p in range(args.policies):
            body: dict[str, Any] = {"name": f"policy {p}", "groups": ["staff"],
                                    "destinations": [f"*.site{p}.example", f"10.{p}.0.0/16"],
                                    "ports": ["443"], "action": "shared"}
            if enterprise and p == 0 and next_v4 <= v6_count:  # loc0 has an IPv6 range
                body |= {"action": "dedicated", "primary": "loc0", "secondary": "loc1"}
            policies.append({"account_id": account_id, "id": f"p{p}", "position": p,
                             "body": body})
    if next_v4 > v4_count:
        raise SystemExit("not enough dedicated IPv4 addresses for the enterprise accounts; "
                         "raise --addresses")
    for table, rows in ((AccountRow, accounts), (LocationRow, locations), (GroupRow, groups),
                        (UserRow, users), (MembershipRow, members), (DeviceRow, devices),
                        (PolicyRow, policies)):
        _bulk(engine, table, rows)
    with engine.begin() as connection:
        connection.execute(ConfigVersion.__table__.update().values(version=2, changed_at=now))
    return {"data_centers": len(dcs), "addresses": len(addresses), "accounts": len(accounts),
            "locations": len(locations), "users": len(users), "devices": len(devices),
            "policies": len(policies)}


# (a) and (c): in this process
# --------------------------------------------------------------------------------------


def measure_build(engine: Engine, repeats: int) -> tuple[list[float], bytes, int]:
    publisher = Publisher(sessions(engine), replica="bench")
    times = []
    body = b""
    version = 0
    for _ in range(repeats):
        started = time.perf_counter()
        published = publisher._build()
        times.append(time.perf_counter() - started)
        body, version = published.body, published.version
    return times, body, version


def measure_pop_load(body: bytes, version: int, repeats: int) -> tuple[list[float], list[float], int]:
    parse, load = [], []
    accounts = 0
    for _ in range(repeats):
        started = time.perf_counter()
        document = json.loads(body)
        parsed = time.perf_counter()
        try:
            snapshot = load_document(document["deployment"], version=version)
        except ValidationError as error:
            issues = str(error).splitlines()
            raise SystemExit(f"the generated store is not valid ({len(issues)} issues):\n"
                             + "\n".join(issues[:5])) from None
        done = time.perf_counter()
        parse.append(parsed - started)
        load.append(done - parsed)
        accounts = len(document["deployment"]["accounts"])
        del snapshot, document
    return parse, load, accounts


# (b): a real server, 50 watchers
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def control_server(url: str, state_dir: Path) -> Iterator[str]:
    port = free_port()
    log_path = state_dir / "server.log"
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "egressd", "control", "serve", "--db", url,
             "--listen", f"127.0.0.1:{port}", "--state-dir", str(state_dir),
             "--replica", "bench", "--log-level", "warning"],
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise SystemExit(f"egressd control serve exited:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"egressd control serve did not start in {START_TIMEOUT:.0f} s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).json().get("version"):
                    break
            time.sleep(0.2)
        yield base
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


async def propagation(base: str, admin: str, pop_token: str, watchers: int, rounds: int
                      ) -> dict[str, Any]:
    admin_headers = {"Authorization": f"Bearer {admin}"}
    limits = httpx.Limits(max_connections=watchers + 5, max_keepalive_connections=watchers + 5)
    received: list[dict[int, float]] = [{} for _ in range(watchers)]
    stop = asyncio.Event()
    arrived = asyncio.Condition()  # notified whenever a watcher receives a version

    async def watcher(index: int, client: httpx.AsyncClient) -> None:
        after = 0
        for _ in range(rounds + 10):  # bounded: one poll per version, and a few timeouts
            if stop.is_set():
                return
            response = await client.get(
                f"{base}/v1/snapshot", params={"after": after, "pop": f"w{index:02d}", "wait": 20},
                headers={"Authorization": f"Bearer {pop_token}"})
            now = time.perf_counter()
            if response.status_code == 200:
                after = int(response.headers["X-Egressd-Version"])
                received[index][after] = now
                async with arrived:
                    arrived.notify_all()
            elif response.status_code != 204:
                raise RuntimeError(f"watcher {index}: {response.status_code} {response.text[:200]}")

    async def parked(client: httpx.AsyncClient, version: int) -> None:
        """Every watcher holds `version` and has asked for the next one."""
        deadline = time.monotonic() + ROUND_TIMEOUT
        while time.monotonic() < deadline:
            pops = (await client.get(f"{base}/v1/version", headers=admin_headers)).json()["pops"]
            if sum(1 for p in pops if p["pop"].startswith("w") and p["version"] >= version) \
                    >= watchers:
                return
            await asyncio.sleep(0.05)
        raise SystemExit(f"the watchers did not all reach version {version}")

    timeout = httpx.Timeout(60.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(timeout=timeout) as admin_client:
        version = (await admin_client.get(f"{base}/v1/version", headers=admin_headers)).json()["version"]
        started = time.perf_counter()
        tasks = [asyncio.create_task(watcher(index, client)) for index in range(watchers)]
        await parked(admin_client, version)
        initial_s = time.perf_counter() - started
        results = []
        for round_number in range(rounds):
            sent = time.perf_counter()
            response = await admin_client.patch(
                f"{base}/v1/accounts/acct{round_number:05d}/settings/network",
                json={"fallback": "shared" if round_number % 2 == 0 else "closed"},
                headers=admin_headers)
            committed = time.perf_counter()
            if response.status_code != 200:
                raise SystemExit(f"the change failed: {response.status_code} {response.text}")
            version += 1
            with contextlib.suppress(TimeoutError):
                async with arrived:
                    await asyncio.wait_for(arrived.wait_for(
                        lambda wanted=version: all(wanted in r for r in received)),
                        ROUND_TIMEOUT)
            arrivals = sorted(r[version] - committed for r in received if version in r)
            if len(arrivals) < watchers:
                raise SystemExit(f"round {round_number}: {len(arrivals)} of {watchers} watchers "
                                 f"got version {version} within {ROUND_TIMEOUT:.0f} s")
            status = (await admin_client.get(f"{base}/v1/version", headers=admin_headers)).json()
            results.append({"change_request_s": round(committed - sent, 3),
                            "first_s": round(arrivals[0], 3),
                            "median_s": round(statistics.median(arrivals), 3),
                            "all_s": round(arrivals[-1], 3),
                            "server_build_ms": status["build_ms"]})
            log(f"  round {round_number}: change {committed - sent:.3f} s, then first watcher "
                f"{arrivals[0]:.3f} s, all {watchers} {arrivals[-1]:.3f} s "
                f"(server build {status['build_ms']} ms)")
            await parked(admin_client, version)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"initial_fetch_all_s": round(initial_s, 3), "rounds": results}


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="postgresql://USER:PASS@HOST/DB (default: SQLite, temporary)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--addresses", type=int, default=100_000)
    parser.add_argument("--data-centers", type=int, default=100)
    parser.add_argument("--users", type=int, default=2, help="per account (one device each)")
    parser.add_argument("--policies", type=int, default=2, help="per account")
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="changes to propagate")
    parser.add_argument("--repeats", type=int, default=3, help="of the in-process timings")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with scratch_store(args.db) as url, tempfile.TemporaryDirectory(prefix="egressd-bench-") as tmp:
        engine = make_engine(url)
        migrate(engine)
        started = time.perf_counter()
        counts = populate(engine, args, rng)
        populate_s = time.perf_counter() - started
        with sessions(engine)() as session, session.begin():
            _, admin = create_token(session, name="bench-admin", scope="deployment")
            _, pop_token = create_token(session, name="bench-pop", scope="pop")
        log(f"store {engine.dialect.name}: {counts} in {populate_s:.1f} s")

        build, body, version = measure_build(engine, args.repeats)
        log(f"(a) Publisher._build: {[round(t, 3) for t in build]} s, {len(body) / 1e6:.1f} MB")
        parse, load, accounts = measure_pop_load(body, version, args.repeats)
        assert accounts == args.accounts
        log(f"(c) PoP json.loads {[round(t, 3) for t in parse]} s + load_document "
            f"{[round(t, 3) for t in load]} s")
        engine.dispose()
        document_bytes = len(body)
        del body

        log(f"(b) egressd control serve, {args.watchers} watchers, {args.rounds} changes")
        with control_server(url, Path(tmp)) as base:
            spread = asyncio.run(propagation(base, admin, pop_token, args.watchers, args.rounds))

    rounds = spread["rounds"]
    result = {
        "benchmark": "control",
        "store": "postgresql" if args.db else "sqlite",
        **counts,
        "document_bytes": document_bytes,
        "populate_s": round(populate_s, 2),
        "build_s": round(min(build), 3),
        "build_s_median": round(statistics.median(build), 3),
        "pop_parse_s": round(statistics.median(parse), 3),
        "pop_load_s": round(statistics.median(load), 3),
        "watchers": args.watchers,
        "initial_fetch_all_s": spread["initial_fetch_all_s"],
        "change_request_s": round(statistics.median(r["change_request_s"] for r in rounds), 3),
        "propagation_first_s": round(statistics.median(r["first_s"] for r in rounds), 3),
        "propagation_all_s": round(statistics.median(r["all_s"] for r in rounds), 3),
        "propagation_all_s_max": max(r["all_s"] for r in rounds),
        "rounds": rounds,
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))
    log(f"summary: build+serialize {result['build_s']} s (target ≤ 2 s); a change reaches all "
        f"{args.watchers} watchers {result['propagation_all_s']} s after its commit (median of "
        f"{len(rounds)}); a PoP parses it in {result['pop_parse_s']} s and validates+indexes "
        f"it in {result['pop_load_s']} s")

if __name__ == "__main__":
    main()
