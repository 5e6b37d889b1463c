"""Benchmark of the egress decision on a large generated snapshot.

10,000 accounts, 200 data centers, 50 policies per account, 100,000 private routes.
Prints one JSON line: decisions_per_s (one core, tight loop), p50_us / p99_us (per call,
timed individually) and build_s (build_snapshot only, not the generation of its input).

    python benchmarks/decide.py [--accounts N] [--flows N] [--seed S]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import random
import statistics
import sys
import time

from egressd.decide import Flow, HealthView, decide
from egressd.model import (
    Account,
    DataCenter,
    DedicatedAction,
    DedicatedLocation,
    EgressPolicy,
    NetworkSettings,
    Plan,
    PrivateRoute,
    RouteKind,
    Selector,
    SharedAction,
    User,
    build_snapshot,
)

POLICY_PROTOCOLS = ("tcp", "udp")  # "dns" never reaches policies (R4)


def make_data_centers(count: int, rng: random.Random) -> list[DataCenter]:
    base = int(ipaddress.IPv4Address("100.64.0.0"))
    return [
        DataCenter(
            code=f"p{i:03d}", city=f"City {i // 2}", country="ZZ", region="",
            latitude=rng.uniform(-60, 60), longitude=rng.uniform(-180, 180),
            shared_ipv4=(ipaddress.IPv4Address(base + i * 4 + 1), ipaddress.IPv4Address(base + i * 4 + 2)),
            shared_ipv6=ipaddress.IPv6Network(f"2001:db8:{i:x}::/48"),
            backbone_address=ipaddress.IPv4Address(base + i * 4 + 3), slot=i + 1,
        )
        for i in range(count)
    ]


def make_accounts(count: int, dcs: list[DataCenter], policies: int, rng: random.Random) -> list[Account]:
    accounts = []
    next_v4 = int(ipaddress.IPv4Address("100.100.0.0"))
    for a in range(count):
        enterprise = rng.random() < 0.5
        locations = []
        if enterprise:
            for index, dc in enumerate(rng.sample(dcs, rng.randint(2, 4))):
                next_v4 += 1
                locations.append(DedicatedLocation(
                    id=f"loc{index}", home_pop=dc.code, ipv4=ipaddress.IPv4Address(next_v4),
                    ipv6=ipaddress.IPv6Network(f"2001:db9:{a:x}:{index:x}00::/56"),
                ))
        users = tuple(User(name=f"u{u}", groups=frozenset({f"g{u % 5}"})) for u in range(20))
        rules = []
        for p in range(policies):
            kind = p % 6
            selector = Selector(
                users=frozenset({f"u{rng.randrange(20)}"}) if kind == 0 else frozenset(),
                groups=frozenset({f"g{rng.randrange(5)}"}) if kind == 1 else frozenset(),
                networks=(ipaddress.IPv4Network((rng.getrandbits(16) << 16, 16)),) if kind == 2 else (),
                hostnames=(f"*.site{p}.example",) if kind == 3 else (f"app{p}.example",) if kind == 4 else (),
                ports=((rng.randint(1, 60000), rng.randint(60001, 65535)),) if kind == 5 else (),
                protocols=frozenset({rng.choice(POLICY_PROTOCOLS)}) if p % 7 == 0 else frozenset(),
            )
            action: SharedAction | DedicatedAction = SharedAction()
            if enterprise and p % 2 == 0:
                action = DedicatedAction(primary="loc0", secondary="loc1", ipv6="loc0")
            rules.append(EgressPolicy(id=f"r{p}", selector=selector, action=action))
        accounts.append(Account(
            id=f"acct{a}", name=f"Account {a}", plan=Plan.ENTERPRISE if enterprise else Plan.FREE,
            settings=NetworkSettings(proxy_tcp=True, proxy_udp=rng.random() < 0.5),
            locations=tuple(locations), users=users, policies=tuple(rules),
        ))
    return accounts


def make_routes(count: int, accounts: int, rng: random.Random) -> list[PrivateRoute]:
    return [
        PrivateRoute(
            id=f"route{r}", account=f"acct{r % accounts}", kind=RouteKind.TUNNEL,
            networks=(ipaddress.IPv4Network(((10 << 24) | (rng.getrandbits(16) << 8), 24)),),
            hostnames=(f"*.corp{r}.example",), via=f"connector{r % accounts}",
        )
        for r in range(count)
    ]


def make_flows(count: int, accounts: int, dcs: list[DataCenter], rng: random.Random,
               zipf: bool = False) -> list[Flow]:
    """Random flows. Uniform account choice is the worst case for CPU caches; `zipf` gives
    the skew of real traffic (a few large tenants carry most flows)."""
    weights = [1 / (rank + 1) for rank in range(accounts)] if zipf else None
    chosen = rng.choices(range(accounts), weights=weights, k=count)
    flows = []
    for index in range(count):
        v6 = rng.random() < 0.3
        address = (ipaddress.IPv6Address((0x2001_0db8_ffff << 80) | rng.getrandbits(64)) if v6
                   else ipaddress.IPv4Address(rng.choice((198, 203, 10)) << 24 | rng.getrandbits(24)))
        hostname = rng.choice((None, f"www.site{rng.randrange(60)}.example", f"app{rng.randrange(60)}.example"))
        flows.append(Flow(
            account=f"acct{chosen[index]}", user=f"u{rng.randrange(20)}", device="d",
            connected_pop=rng.choice(dcs).code, protocol=rng.choice(("tcp", "tcp", "tcp", "udp", "dns")),
            address=address, port=rng.choice((443, 80, 8443, 53, 65000)), hostname=hostname,
        ))
    return flows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--data-centers", type=int, default=200)
    parser.add_argument("--policies", type=int, default=50)
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--flows", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform",
                        help="how flows pick accounts (uniform = every account equally: worst case)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    dcs = make_data_centers(args.data_centers, rng)
    accounts = make_accounts(args.accounts, dcs, args.policies, rng)
    routes = make_routes(args.routes, args.accounts, rng)
    print("generated input", file=sys.stderr)
    gc.collect()
    started = time.perf_counter()
    snapshot = build_snapshot(version=1, data_centers=dcs, accounts=accounts, routes=routes)
    build_s = time.perf_counter() - started
    codes = [dc.code for dc in dcs]
    view = HealthView(up=frozenset(codes),
                      rtt_ms={(a, b): rng.uniform(1, 150) for a in codes for b in codes if a != b})
    flows = make_flows(args.flows, args.accounts, dcs, rng, zipf=args.popularity == "zipf")
    gc.collect()
    gc.freeze()  # the decision allocates little; keep the collector's pauses out of the loop
    outcomes: dict[str, int] = {}
    for flow in flows[:1000]:
        decision = decide(snapshot, flow, view)
        outcomes[decision.egress.value] = outcomes.get(decision.egress.value, 0) + 1
    started = time.perf_counter()
    for flow in flows:
        decide(snapshot, flow, view)
    loop_s = time.perf_counter() - started
    timings = []
    clock = time.perf_counter_ns
    for flow in flows:
        t0 = clock()
        decide(snapshot, flow, view)
        timings.append(clock() - t0)
    timings.sort()
    result = {
        "benchmark": "decide",
        "accounts": args.accounts, "data_centers": args.data_centers,
        "policies_per_account": args.policies, "popularity": args.popularity, "private_routes": args.routes, "flows": len(flows),
        "build_s": round(build_s, 3),
        "decisions_per_s": round(len(flows) / loop_s),
        "p50_us": round(statistics.median(timings) / 1000, 2),
        "p99_us": round(timings[int(len(timings) * 0.99)] / 1000, 2),
        "sample_outcomes": outcomes,
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
