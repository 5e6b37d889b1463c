"""The admission bookkeeping: per-source sets and counters, and the login throttle."""

from __future__ import annotations

from dataclasses import dataclass

from egressd.pop.admission import AuthThrottle, PeerSet, SourceCounter


@dataclass(eq=False)
class Conn:
    peer: tuple[str, int]


def test_peer_set_counts_per_source() -> None:
    conns = PeerSet[Conn]()
    a1, a2, b1 = Conn(("10.0.0.1", 1)), Conn(("10.0.0.1", 2)), Conn(("10.0.0.2", 1))
    for conn in (a1, a2, b1, a1):
        conns.add(conn)
    assert len(conns) == 3 and conns.per_source == {"10.0.0.1": 2, "10.0.0.2": 1}
    conns.discard(a1)
    conns.discard(a1)
    conns.discard(b1)
    assert conns.per_source == {"10.0.0.1": 1} and list(conns) == [a2] and a2 in conns


def test_source_counter_caps_and_releases() -> None:
    counter = SourceCounter(limit=2)
    assert counter.try_acquire("acme") and counter.try_acquire("acme")
    assert not counter.try_acquire("acme")
    assert counter.try_acquire("globex")
    counter.release("acme")
    assert counter["acme"] == 1 and counter.try_acquire("acme")
    unlimited = SourceCounter(limit=0)
    assert all(unlimited.try_acquire("x") for _ in range(10_000))


def test_auth_throttle_blocks_after_the_limit_until_the_window_ends() -> None:
    throttle = AuthThrottle(limit=3, window=60.0)
    assert not throttle.blocked("10.0.0.1", now=0.0)
    assert [throttle.failed("10.0.0.1", now=t) for t in (1.0, 2.0, 3.0)] == [False, False, True]
    assert throttle.blocked("10.0.0.1", now=4.0)
    assert not throttle.blocked("10.0.0.2", now=4.0)
    assert not throttle.blocked("10.0.0.1", now=61.0)  # the window (from the first failure) ended
    assert not throttle.failed("10.0.0.1", now=62.0)  # a new window
    assert not AuthThrottle(limit=0, window=60.0).blocked("10.0.0.1")


def test_auth_throttle_memory_is_bounded() -> None:
    throttle = AuthThrottle(limit=3, window=60.0)
    throttle.MAX_SOURCES = 100
    for index in range(1000):
        throttle.failed(f"10.0.{index // 256}.{index % 256}", now=float(index))
    assert len(throttle._failures) <= 100
