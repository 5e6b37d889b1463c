"""Per-flow Prometheus figures (`pop/flow_metrics.py`): added up, in prometheus-client
within the flush delay or at once by `flush()` (a scrape), at once outside a loop."""

from __future__ import annotations

import asyncio

from egressd.pop.flow_metrics import FlowMetrics
from egressd.pop.metrics import PopMetrics

KEY = ("tcp", "shared", "R1", "ok")


def value(metrics: PopMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, {"pop": "lax", **labels})
    return found or 0.0


def test_outside_a_loop_every_change_is_counted_at_once() -> None:
    metrics = PopMetrics()
    flows = FlowMetrics(metrics, "lax")
    flows.tcp_opened()
    assert value(metrics, "egressd_active_flows", protocol="tcp") == 1
    flows.flow_ended(KEY, 10, 20)
    flows.tcp_closed()
    assert value(metrics, "egressd_flows_total", protocol="tcp", egress="shared", rule="R1", outcome="ok") == 1
    assert value(metrics, "egressd_bytes_total", direction="up") == 10
    assert value(metrics, "egressd_bytes_total", direction="down") == 20
    assert value(metrics, "egressd_active_flows", protocol="tcp") == 0


def test_changes_are_handed_over_after_the_flush_delay_or_by_a_flush() -> None:
    async def body() -> None:
        metrics = PopMetrics()
        flows = FlowMetrics(metrics, "lax", flush_delay=0.05)
        for _ in range(3):
            flows.tcp_opened()
            flows.flow_ended(KEY, 1, 2)
        flows.tcp_closed()
        flows.flow_ended(("udp", "dedicated", "R3", "ok"), 0, 5)
        await asyncio.sleep(0)
        assert value(metrics, "egressd_bytes_total", direction="up") == 0  # not yet: batched
        await asyncio.sleep(0.2)
        labels = {"protocol": "tcp", "egress": "shared", "rule": "R1", "outcome": "ok"}
        assert value(metrics, "egressd_flows_total", **labels) == 3
        assert value(metrics, "egressd_flows_total", protocol="udp", egress="dedicated", rule="R3",
                     outcome="ok") == 1
        assert value(metrics, "egressd_bytes_total", direction="up") == 3
        assert value(metrics, "egressd_bytes_total", direction="down") == 11
        assert value(metrics, "egressd_active_flows", protocol="tcp") == 2
        flows.tcp_closed()
        flows.flush()  # as a scrape in this process does, and the PoP when it closes
        assert value(metrics, "egressd_active_flows", protocol="tcp") == 1
        flows.tcp_opened()  # a flush cancels the pending hand-over: the next change arms anew
        await asyncio.sleep(0.2)
        assert value(metrics, "egressd_active_flows", protocol="tcp") == 2
    asyncio.run(body())


def test_a_scrape_sees_the_flows_of_its_process_at_once() -> None:
    """The default delay is long enough to batch, and a scrape never waits for it."""
    async def body() -> None:
        metrics = PopMetrics()
        flows = FlowMetrics(metrics, "lax")
        flows.flow_ended(KEY, 7, 9)
        assert value(metrics, "egressd_bytes_total", direction="up") == 0
        flows.flush()
        assert value(metrics, "egressd_bytes_total", direction="up") == 7
    asyncio.run(body())


def test_connect_times_land_in_the_same_buckets_as_observe() -> None:
    samples = [0.0003, 0.0005, 0.002, 0.002, 0.3, 7.0]
    reference = PopMetrics()
    for seconds in samples:
        reference.connect_seconds.labels("lax", "local").observe(seconds)

    async def body() -> PopMetrics:
        metrics = PopMetrics()
        flows = FlowMetrics(metrics, "lax")
        for seconds in samples:
            flows.connect_observed("local", seconds)
        flows.flush()
        return metrics

    batched = asyncio.run(body())

    def histogram(metrics: PopMetrics) -> list[tuple[str, dict[str, str], float]]:
        (family,) = [f for f in metrics.registry.collect() if f.name == "egressd_upstream_connect_seconds"]
        return [(s.name, s.labels, s.value) for s in family.samples if not s.name.endswith("_created")]

    assert histogram(batched) == histogram(reference)
    assert value(batched, "egressd_upstream_connect_seconds_count", path="local") == len(samples)
