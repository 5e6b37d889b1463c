"""Benchmark of the web dashboard: how fast each page shows its data on a large store.

1,000 accounts and 10,000 inventory addresses (bulk-inserted with SQLAlchemy Core into a
temporary SQLite store, not through the API): 20 data centers, 30 % of the accounts
enterprise with 3 dedicated locations each, users, devices and policies, and 2,000 flows
pushed to the flow feed. The real app serves it (`egressd control serve`, its own process);
headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) loads each page from
scratch (about:blank, then the page's URL) with an admin token in sessionStorage.

What is measured, in the browser, with the Performance API: from the navigation's start
(`performance.timeOrigin`) to the mark the page sets once its data is rendered
(`egressd:ready:<page>`): HTML, CSS, the JavaScript modules, every API call the page makes
and the DOM it builds. The first load of each page is reported apart (`cold_ms`: nothing
cached); then `--runs` loads (`median_ms`, `max_ms`; the browser revalidates the static
files, which answer 304). Also: the assign form's free-address list for one PoP (`select`
to options rendered) and the account picker's search. Budget: 300 ms per page.

Prints one JSON line; a human summary goes to stderr.

    python benchmarks/dashboard.py [--accounts N] [--addresses N] [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, insert, update

from egressd.control.auth import create_token
from egressd.control.db import make_engine, migrate, sessions
from egressd.control.tables import (
    AccountRow,
    AddressRow,
    ConfigVersion,
    DataCenterRow,
    DeviceRow,
    LocationRow,
    PolicyRow,
    PopStatusRow,
    UserRow,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BUDGET_MS = 300.0
PAGES = {"overview": "overview", "egress": "egress", "network": "settings/network",
         "policies": "policies", "devices": "devices", "flows": "flows"}
CITIES = [  # code, city, country, latitude, longitude
    ("las", "Las Vegas", "US", 36.17, -115.14), ("lax", "Los Angeles", "US", 34.05, -118.24),
    ("jfk", "New York", "US", 40.71, -74.01), ("ord", "Chicago", "US", 41.88, -87.63),
    ("dfw", "Dallas", "US", 32.78, -96.80), ("sea", "Seattle", "US", 47.61, -122.33),
    ("yyz", "Toronto", "CA", 43.65, -79.38), ("gru", "São Paulo", "BR", -23.55, -46.63),
    ("lhr", "London", "GB", 51.51, -0.13), ("cdg", "Paris", "FR", 48.86, 2.35),
    ("fra", "Frankfurt", "DE", 50.11, 8.68), ("ams", "Amsterdam", "NL", 52.37, 4.90),
    ("mad", "Madrid", "ES", 40.42, -3.70), ("jnb", "Johannesburg", "ZA", -26.20, 28.05),
    ("dxb", "Dubai", "AE", 25.20, 55.27), ("bom", "Mumbai", "IN", 19.08, 72.88),
    ("sin", "Singapore", "SG", 1.35, 103.82), ("nrt", "Tokyo", "JP", 35.68, 139.69),
    ("syd", "Sydney", "AU", -33.87, 151.21), ("hkg", "Hong Kong", "HK", 22.32, 114.17),
]
SHARED_PER_POP = 4
HEAVY = "acct-0000"  # the account the account pages show: the most locations and policies


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# The store
# --------------------------------------------------------------------------------------


def seed(engine: Engine, accounts: int, addresses: int) -> dict[str, Any]:
    """Bulk rows through SQLAlchemy Core. Returns what the pages will show."""
    rng = random.Random(8)
    now = datetime.now(UTC)
    pops = [code for code, *_ in CITIES]
    v4 = (str(ipaddress.IPv4Address("198.18.0.0") + n) for n in range(1, 1 << 17))  # RFC 2544
    v6 = (f"2001:db8:{n:x}::/48" for n in range(1, 0xFFFF))
    dcs = [{"code": code, "city": city, "country": country, "region": "", "latitude": lat,
            "longitude": lon, "backbone": None, "slot": slot}
           for slot, (code, city, country, lat, lon) in enumerate(CITIES, start=1)]
    inventory: list[dict[str, Any]] = []
    for code in pops:
        inventory += [{"address": next(v4), "family": 4, "kind": "shared", "data_center": code}
                      for _ in range(SHARED_PER_POP)]
        inventory.append({"address": next(v6), "family": 6, "kind": "shared", "data_center": code})
    dedicated_v6 = addresses // 10
    dedicated_v4 = addresses - len(inventory) - dedicated_v6
    free_v4: dict[str, list[str]] = {code: [] for code in pops}
    free_v6: dict[str, list[str]] = {code: [] for code in pops}
    for n in range(dedicated_v4):
        code = pops[n % len(pops)]
        address = next(v4)
        inventory.append({"address": address, "family": 4, "kind": "dedicated", "data_center": code})
        free_v4[code].append(address)
    for n in range(dedicated_v6):
        code = pops[n % len(pops)]
        prefix = next(v6)
        inventory.append({"address": prefix, "family": 6, "kind": "dedicated", "data_center": code})
        free_v6[code].append(prefix)

    rows: dict[str, list[dict[str, Any]]] = {"accounts": [], "locations": [], "users": [],
                                             "devices": [], "policies": []}
    for n in range(accounts):
        account = f"acct-{n:04d}"
        enterprise = n == 0 or rng.random() < 0.3
        rows["accounts"].append({"id": account, "name": f"Account {n:04d} Ltd", "plan":
                                 "enterprise" if enterprise else "free", "proxy_tcp": True,
                                 "proxy_udp": enterprise, "fallback": "closed", "created_at": now})
        locations = []
        if enterprise:
            homes = rng.sample(pops, 12 if account == HEAVY else 3)
            for code in homes:
                locations.append(code)
                rows["locations"].append({
                    "account_id": account, "id": code, "ipv4": free_v4[code].pop(),
                    "ipv6": free_v6[code].pop() if free_v6[code] else None,
                    "state": "active", "assigned_at": now})
        users = 40 if account == HEAVY else 3
        for u in range(users):
            rows["users"].append({"account_id": account, "name": f"user{u}"})
            rows["devices"].append({"id": f"{account}-user{u}-laptop", "account_id": account,
                                    "user_name": f"user{u}", "created_at": now,
                                    "secret_sha256": hashlib.sha256(f"{account}{u}".encode()).hexdigest()})
        for p in range(40 if account == HEAVY else 2):
            body: dict[str, Any] = {"name": f"policy {p}", "destinations": [f"*.svc{p}.example"],
                                    "ports": ["443"]}
            if locations and p % 2:
                body |= {"action": "dedicated", "primary": locations[0], "secondary": "shared"}
            else:
                body["action"] = "shared"
            rows["policies"].append({"account_id": account, "id": f"p{p}", "position": p,
                                     "body": body})

    tables = [(DataCenterRow, dcs), (AddressRow, inventory), (AccountRow, rows["accounts"]),
              (LocationRow, rows["locations"]), (UserRow, rows["users"]),
              (DeviceRow, rows["devices"]), (PolicyRow, rows["policies"])]
    with engine.begin() as connection:
        for table, values in tables:
            for start in range(0, len(values), 5000):
                connection.execute(insert(table), values[start:start + 5000])
        connection.execute(update(ConfigVersion).where(ConfigVersion.id == 1).values(version=2))
        connection.execute(insert(PopStatusRow), [
            {"pop": code, "version": 2, "seen_at": now, "replica": "bench"} for code in pops])
    with sessions(engine)() as session, session.begin():
        _, token = create_token(session, name="bench-admin", scope="deployment")
    return {"token": token, "addresses": len(inventory), "accounts": accounts,
            "locations": len(rows["locations"]), "policies": len(rows["policies"])}


def flows(accounts: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(9)
    pops = [code for code, *_ in CITIES]
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    records = []
    for n in range(count):
        connected, egress = rng.choice(pops), rng.choice(pops)
        records.append({
            "time": now, "flow_id": f"{connected}-1-{n}",
            "account": HEAVY if n % 4 == 0 else f"acct-{rng.randrange(accounts):04d}",
            "user": "user0", "device": "laptop", "protocol": "tcp", "client": "127.0.0.1:40000",
            "destination": "192.0.2.10", "hostname": "www.example.com", "port": 443,
            "connected_pop": connected, "egress_pop": egress, "egress": "dedicated",
            "source": "198.18.0.9:40001", "logical_location": "?", "rule": "R6",
            "path": "backbone" if connected != egress else "direct", "bytes_up": 500,
            "bytes_down": 9000, "duration_ms": 20.0, "outcome": "ok"})
    return records


# The server: `egressd control serve` in its own process, as in production
# --------------------------------------------------------------------------------------


class Served:
    def __init__(self, database: str, state_dir: Path) -> None:
        self._database = database
        self._state_dir = state_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log = state_dir / "control.log"  # its warnings, kept out of the benchmark's output
        self.url = ""

    def __enter__(self) -> Served:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        with self._log.open("wb") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "egressd", "control", "serve", "--state-dir", str(self._state_dir),
                 "--db", self._database, "--listen", f"127.0.0.1:{port}", "--replica", "bench",
                 "--log-level", "warning"], stdin=subprocess.DEVNULL, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=log_file)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise SystemExit(f"egressd control serve exited with {self._process.returncode}:\n"
                                 + self._log.read_text(errors="replace")[-2000:])
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise SystemExit("egressd control serve did not answer within 120 s")

    def __exit__(self, *_: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


# The browser
# --------------------------------------------------------------------------------------


def measure(url: str, token: str, runs: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    results: dict[str, Any] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.add_init_script(f"sessionStorage.setItem('egressd.token', {json.dumps(token)});")
        page = context.new_page()
        page.set_default_timeout(30_000)

        def load(name: str) -> float:
            page.goto("about:blank")
            page.goto(f"{url}/#/{PAGES[name]}?account={HEAVY}")
            page.wait_for_selector(f"main[data-ready={name}]")
            mark: float = page.evaluate(
                f"performance.getEntriesByName('egressd:ready:{name}')[0].startTime")
            return mark

        for name in PAGES:
            cold = load(name)
            times = [load(name) for _ in range(runs)]
            results[name] = {"cold_ms": round(cold, 1), "median_ms": round(statistics.median(times), 1),
                             "max_ms": round(max(times), 1)}
            log(f"  {name:9} cold {cold:6.1f} ms   median {statistics.median(times):6.1f} ms   "
                f"max {max(times):6.1f} ms")

        # The assign form's free-address list for one PoP, and the account picker's search.
        load("egress")
        assign = []
        for code in ("lax", "fra", "syd") * max(1, runs // 3):
            page.select_option("#assign-pop", "")
            started = time.perf_counter()
            page.select_option("#assign-pop", code)
            page.wait_for_selector(f"#assign-inventory:has-text('at {code}')")
            assign.append((time.perf_counter() - started) * 1000)
        results["egress-assign-list"] = {"median_ms": round(statistics.median(assign), 1),
                                         "max_ms": round(max(assign), 1)}
        search = []
        for query in ("acct-09", "Account 05", "acct-0123") * max(1, runs // 3):
            started = time.perf_counter()
            status = page.evaluate("""async (q) => {
                const r = await fetch('/v1/ui/accounts?limit=20&q=' + encodeURIComponent(q),
                  {headers: {Authorization: 'Bearer ' + sessionStorage.getItem('egressd.token')}});
                return r.status; }""", query)
            assert status == 200
            search.append((time.perf_counter() - started) * 1000)
        results["account-search"] = {"median_ms": round(statistics.median(search), 1),
                                     "max_ms": round(max(search), 1)}
        browser.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--addresses", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--flows", type=int, default=2000)
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="egressd-dashboard-") as folder:
        database = f"sqlite:///{Path(folder) / 'control.db'}"
        engine = make_engine(database)
        migrate(engine)
        started = time.perf_counter()
        store = seed(engine, args.accounts, args.addresses)
        engine.dispose()
        log(f"seeded {store['accounts']} accounts, {store['addresses']} addresses, "
            f"{store['locations']} locations, {store['policies']} policies in "
            f"{time.perf_counter() - started:.1f} s")
        with Served(database, Path(folder)) as served:
            headers = {"Authorization": f"Bearer {store['token']}"}
            records = flows(args.accounts, args.flows)
            for start in range(0, len(records), 500):
                response = httpx.post(f"{served.url}/v1/flows", headers=headers, timeout=30,
                                      json={"flows": records[start:start + 500]})
                response.raise_for_status()
            log(f"serving on {served.url}; loading each page {args.runs + 1} times")
            pages = measure(served.url, store["token"], args.runs)
    worst = max(pages[name]["median_ms"] for name in PAGES)
    print(json.dumps({
        "benchmark": "dashboard", "accounts": store["accounts"], "addresses": store["addresses"],
        "locations": store["locations"], "policies": store["policies"], "flows": args.flows,
        "runs": args.runs, "budget_ms": BUDGET_MS, "pages": pages,
        "worst_median_ms": worst, "within_budget": worst < BUDGET_MS,
    }, separators=(",", ":")))


if __name__ == "__main__":
    main()
