"""Decisions remembered per snapshot and health view (`pop/decision_memo.py`): the same
answers as `decide`, and nothing kept across a new snapshot or view."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from egressd.decide import Flow, HealthView, decide
from egressd.model.deployment import load_deployment
from egressd.pop.decision_memo import DecisionMemo
from egressd.pop.identity import Identity

BENCH = (Path(__file__).resolve().parents[2] / "benchmarks" / "deployment.toml").read_text()
ORIGIN = ipaddress.IPv4Address("127.0.0.1")
DEVICE = Identity("bench", "bench", "bench")


def direct(snapshot, identity, address, port, hostname=None):  # type: ignore[no-untyped-def]
    flow = Flow(account=identity.account if identity else None, user=identity.user if identity else "",
                device=identity.device if identity else "", connected_pop="bench", protocol="tcp",
                address=address, port=port, hostname=hostname)
    return decide(snapshot, flow, HealthView(up=frozenset({"bench"})))


def test_remembered_decisions_are_decide_s() -> None:
    snapshot, view = load_deployment(BENCH), HealthView(up=frozenset({"bench"}))
    memo = DecisionMemo("bench")
    first = memo.decide(snapshot, view, DEVICE, "tcp", ORIGIN, 19001, None)
    assert first == direct(snapshot, DEVICE, ORIGIN, 19001)
    assert not first.refused and str(first.source_address) == "127.0.0.2"
    assert memo.decide(snapshot, view, DEVICE, "tcp", ORIGIN, 19001, None) is first
    # Every input is part of the key: none of these may get the remembered answer.
    elsewhere = ipaddress.IPv4Address("127.0.0.3")  # not allowed: R13
    assert memo.decide(snapshot, view, DEVICE, "tcp", elsewhere, 19001, None).refused
    assert memo.decide(snapshot, view, None, "tcp", ORIGIN, 19001, None).refused
    other = Identity("bench", "bench", "bench")  # equal, but not the same object: decided again
    assert memo.decide(snapshot, view, other, "tcp", ORIGIN, 19001, None) == first


def test_a_new_snapshot_or_view_empties_the_memo() -> None:
    snapshot, view = load_deployment(BENCH), HealthView(up=frozenset({"bench"}))
    memo = DecisionMemo("bench")
    assert not memo.decide(snapshot, view, DEVICE, "tcp", ORIGIN, 19001, None).refused
    closed = load_deployment(BENCH.replace('allow_destinations = ["127.0.0.1/32"]', "allow_destinations = []"))
    assert memo.decide(closed, view, DEVICE, "tcp", ORIGIN, 19001, None).refused  # loopback: R13
    assert len(memo._entries) == 1
    memo.decide(closed, HealthView(up=frozenset({"bench"})), DEVICE, "tcp", ORIGIN, 19001, None)
    assert len(memo._entries) == 1  # a new view (each backbone probe makes one) starts afresh


def test_the_memo_is_bounded() -> None:
    snapshot, view = load_deployment(BENCH), HealthView(up=frozenset({"bench"}))
    memo = DecisionMemo("bench", size=3)
    for port in range(1, 10):
        assert memo.decide(snapshot, view, DEVICE, "tcp", ORIGIN, port, None) == direct(snapshot, DEVICE, ORIGIN, port)
        assert len(memo._entries) <= 3
